import pytest
import torch
from torch import nn

from ds_autofreeze.model_adapter import SUPPORTED_MODEL_TYPES, ModelAdapter, UnsupportedModelError

SMALL = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64, num_labels=3)


def build(family: str, layers: int = 4):
    import transformers as tf
    torch.manual_seed(0)
    if family == "bert":
        return tf.BertForSequenceClassification(tf.BertConfig(vocab_size=100, num_hidden_layers=layers, **SMALL))
    if family == "roberta":
        return tf.RobertaForSequenceClassification(tf.RobertaConfig(vocab_size=100, num_hidden_layers=layers,
                                                                     max_position_embeddings=40, **SMALL))
    if family == "electra":
        return tf.ElectraForSequenceClassification(tf.ElectraConfig(vocab_size=100, num_hidden_layers=layers,
                                                                    embedding_size=16, **SMALL))
    if family == "distilbert":
        return tf.DistilBertForSequenceClassification(tf.DistilBertConfig(
            vocab_size=100, n_layers=layers, dim=32, n_heads=2, hidden_dim=64, num_labels=3))
    if family == "gpt2":
        return tf.GPT2ForSequenceClassification(tf.GPT2Config(vocab_size=100, n_layer=layers, n_embd=32, n_head=2,
                                                               n_positions=40, num_labels=3, pad_token_id=0))
    if family == "llama":
        return tf.LlamaForSequenceClassification(tf.LlamaConfig(
            vocab_size=100, num_hidden_layers=layers, num_key_value_heads=1, pad_token_id=0,
            max_position_embeddings=40, **SMALL))
    raise ValueError(family)


def inputs():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 100, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    ids[1, 7:] = 0
    return {"input_ids": ids, "attention_mask": mask}


FAMILIES = ["bert", "roberta", "electra", "distilbert", "gpt2", "llama"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("start", [1, 3])
def test_adapter_runs_from_block_k_exactly(family, start):
    model = build(family).eval()
    adapter = ModelAdapter(model)
    assert adapter.num_blocks == 4
    batch = inputs()
    captured: list = []
    with torch.no_grad(), adapter.capture_input(start, captured):
        full = model(**batch).logits
    assert captured[0].shape == (3, 10, model.config.hidden_size if family != "distilbert" else 32)
    # What reaches block `start` must not depend on what the earlier blocks would compute.
    for block in adapter.blocks[:start]:
        for p in block.parameters():
            p.data.normal_()
    with torch.no_grad(), adapter.run_from(start, captured[0]):
        resumed = model(**batch).logits
    assert torch.equal(full, resumed)
    # The model is back to its full block list afterwards.
    with torch.no_grad():
        assert not torch.equal(model(**batch).logits, full)


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_freezes_embeddings_with_block_zero(family):
    model = build(family).train()
    adapter = ModelAdapter(model)
    adapter.set_frozen(2)
    frozen = {id(p) for m in adapter.embeddings + adapter.blocks[:2] for p in m.parameters()}
    assert frozen
    for p in model.parameters():
        assert p.requires_grad == (id(p) not in frozen)
    assert all(not m.training for m in adapter.embeddings + adapter.blocks[:2])
    assert all(m.training for m in adapter.blocks[2:])
    model.train()
    adapter.restore_frozen_eval()
    assert all(not m.training for m in adapter.blocks[:2])


def test_adapter_frozen_prefix_builds_no_graph():
    model = build("bert").train()
    adapter = ModelAdapter(model)
    adapter.set_frozen(2)
    captured: list = []
    with adapter.capture_input(2, captured):
        model(**inputs()).logits.sum().backward()
    assert not captured[0].requires_grad  # block 2's input carries no autograd history
    assert all(p.grad is None for b in adapter.blocks[:2] for p in b.parameters())
    assert all(p.grad is not None for p in adapter.blocks[2].parameters())


def test_adapter_boundary_only_grows():
    adapter = ModelAdapter(build("bert"))
    adapter.set_frozen(2)
    with pytest.raises(ValueError, match="only grows"):
        adapter.set_frozen(1)


def test_adapter_rejects_unsupported_models_naming_supported():
    import transformers as tf
    t5 = tf.T5ForSequenceClassification(tf.T5Config(vocab_size=100, d_model=16, d_ff=32, num_layers=1,
                                                     num_heads=2, d_kv=8))
    with pytest.raises(UnsupportedModelError, match="'t5'.*supported model types: " + ", ".join(SUPPORTED_MODEL_TYPES)):
        ModelAdapter(t5)
    with pytest.raises(UnsupportedModelError, match="None"):
        ModelAdapter(nn.Linear(2, 2))


def test_adapter_rejects_headless_base_model():
    import transformers as tf
    base = tf.BertModel(tf.BertConfig(vocab_size=100, num_hidden_layers=2, **SMALL))
    with pytest.raises(UnsupportedModelError, match="ForSequenceClassification"):
        ModelAdapter(base)
