import contextlib

import pytest
import torch
from torch import nn

from conftest import ds_config
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
    if family == "mpnet":
        return tf.MPNetForSequenceClassification(tf.MPNetConfig(vocab_size=100, num_hidden_layers=layers,
                                                                max_position_embeddings=40, pad_token_id=1, **SMALL))
    raise ValueError(family)


def inputs():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 100, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    ids[1, 7:] = 0
    return {"input_ids": ids, "attention_mask": mask}


FAMILIES = ["bert", "roberta", "electra", "distilbert", "gpt2", "llama", "mpnet"]


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
    prefix = adapter.embeddings + adapter.shared_frozen + adapter.blocks[:2]
    frozen = {id(p) for m in prefix for p in m.parameters()}
    assert frozen
    for p in model.parameters():
        assert p.requires_grad == (id(p) not in frozen)
    assert all(not m.training for m in prefix)
    assert all(m.training for m in adapter.blocks[2:])
    model.train()  # as an engine or a Trainer does before each epoch
    model(**inputs())
    assert all(not m.training for m in prefix) and all(m.training for m in adapter.blocks[2:])


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
    opt = tf.OPTForSequenceClassification(tf.OPTConfig(vocab_size=100, hidden_size=16, ffn_dim=32, num_hidden_layers=1,
                                                       num_attention_heads=2, word_embed_proj_dim=16))
    with pytest.raises(UnsupportedModelError, match="'opt'.*supported model types: " + ", ".join(SUPPORTED_MODEL_TYPES)):
        ModelAdapter(opt)
    with pytest.raises(UnsupportedModelError, match="None"):
        ModelAdapter(nn.Linear(2, 2))


def test_adapter_rejects_a_model_without_blocks():
    model = build("bert")
    model.bert.encoder.layer = nn.ModuleList()
    with pytest.raises(UnsupportedModelError, match="block list at 'encoder.layer'"):
        ModelAdapter(model)


# Decoder-only causal-LM heads; "llama-tied-lm" is a Llama whose LM head is its input embedding.
CAUSAL_LMS = ["gpt2-lm", "llama-lm", "llama-tied-lm", "mistral-lm", "qwen2-lm"]
# Heads scoring every position: the hidden states of padding positions reach their loss.
TOKEN_LEVEL = ["bert-qa", *CAUSAL_LMS]


def causal_lm(kind: str, layers: int):
    """A tiny random causal LM, attention dropout on. Mistral and Qwen2 attend within a sliding window
    shorter than the test sequences; Qwen2 only from block 1 on (its per-layer attention types)."""
    import transformers as tf
    decoder = dict(vocab_size=100, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                   num_key_value_heads=1, intermediate_size=64, max_position_embeddings=40, attention_dropout=0.2)
    if kind == "gpt2-lm":
        return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=100, n_layer=layers, n_embd=32, n_head=2, n_positions=40))
    if kind in ("llama-lm", "llama-tied-lm"):
        return tf.LlamaForCausalLM(tf.LlamaConfig(tie_word_embeddings=kind == "llama-tied-lm", **decoder))
    if kind == "mistral-lm":
        return tf.MistralForCausalLM(tf.MistralConfig(sliding_window=4, **decoder))
    if kind == "qwen2-lm":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(use_sliding_window=True, sliding_window=4, max_window_layers=1,
                                                  **decoder))
    raise ValueError(kind)


def task_model(kind: str, layers: int = 3):
    """A tiny random model of each task head, with a batch of its inputs and labels
    (``seq-<family>``: a sequence classifier of that family)."""
    import transformers as tf
    if kind.startswith("seq-"):
        return build(kind[4:], layers), {**inputs(), "labels": torch.tensor([0, 1, 2])}
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(4, 100, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:], ids[1, 7:] = 0, 0
    if kind in CAUSAL_LMS:
        # labels = input_ids, padding included: every position is scored, as in a packed block.
        return causal_lm(kind, layers), {"input_ids": ids, "attention_mask": mask, "labels": ids.clone()}
    bert = tf.BertConfig(vocab_size=100, num_hidden_layers=layers, hidden_dropout_prob=0.2, **{**SMALL, "num_labels": 2})
    if kind == "bert-qa":
        return tf.BertForQuestionAnswering(bert), {"input_ids": ids, "attention_mask": mask,
                                                  "start_positions": torch.tensor([1, 2, 0]),
                                                  "end_positions": torch.tensor([3, 2, 0])}
    if kind == "bert-mc":
        return tf.BertForMultipleChoice(bert), {"input_ids": ids.view(1, 3, 10), "attention_mask": mask.view(1, 3, 10),
                                               "labels": torch.tensor([2])}
    labels = torch.randint(4, 100, (3, 5), generator=g)
    labels[2, 3:] = -100
    if kind == "bart":
        config = tf.BartConfig(vocab_size=100, d_model=16, encoder_layers=layers, decoder_layers=2,
                               encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                               decoder_ffn_dim=32, max_position_embeddings=40, dropout=0.2)
        return tf.BartForConditionalGeneration(config), {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if kind == "t5":
        config = tf.T5Config(vocab_size=100, d_model=16, d_kv=8, d_ff=32, num_layers=layers, num_decoder_layers=2,
                             num_heads=2, dropout_rate=0.2, decoder_start_token_id=0)
        return tf.T5ForConditionalGeneration(config), {"input_ids": ids, "attention_mask": mask, "labels": labels}
    raise ValueError(kind)


def model_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k not in ("labels", "start_positions", "end_positions")}


def loss_and_grads(model, batch: dict, run) -> tuple:
    model.zero_grad()
    torch.manual_seed(7)
    with run():
        loss = model(**batch).loss
    loss.backward()
    return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


KINDS = ["bert-qa", "bert-mc", "bart", "t5", *CAUSAL_LMS, *(f"seq-{f}" for f in FAMILIES)]


@pytest.mark.parametrize("kind", KINDS)
def test_padding_rows_reach_the_loss_only_through_token_level_heads(kind):
    """The cache drops padding rows (they come back as zeros) exactly where the adapter says the
    head never reads them: there, zeroing them leaves loss and gradients bitwise unchanged; a QA
    head and a causal-LM head score every position, so there it would not."""
    model, batch = task_model(kind)
    adapter = ModelAdapter(model)
    model.train()
    adapter.set_frozen(1)
    hidden = adapter.hidden_before(1, model_inputs(batch))
    zeroed = hidden * batch["attention_mask"].reshape(*hidden.shape[:2], 1)
    loss, grads = loss_and_grads(model, batch, lambda: adapter.run_from(1, hidden))
    zloss, zgrads = loss_and_grads(model, batch, lambda: adapter.run_from(1, zeroed))
    unchanged = torch.equal(loss, zloss) and all(torch.equal(grads[n], zgrads[n]) for n in grads)
    assert unchanged == adapter.pad_rows_unread == (kind not in TOKEN_LEVEL)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("start", [1, 2])
def test_task_heads_run_from_block_k_exactly_in_training(kind, start):
    """Every task head: with blocks[:start] frozen, training from the frozen prefix's stored output
    gives the loss and gradients of the full forward, dropout in the trainable part included (and
    Qwen2's per-layer attention types: block ``start`` keeps its own sliding window)."""
    model, batch = task_model(kind)
    adapter = ModelAdapter(model)
    assert adapter.num_blocks == 3  # encoder-decoder: the encoder's blocks only
    model.train()
    adapter.set_frozen(start)
    hidden = adapter.hidden_before(start, model_inputs(batch))
    full_loss, full_grads = loss_and_grads(model, batch, contextlib.nullcontext)
    cached_loss, cached_grads = loss_and_grads(model, batch, lambda: adapter.run_from(start, hidden))
    assert torch.equal(full_loss, cached_loss)
    assert full_grads.keys() == cached_grads.keys() and full_grads
    assert all(torch.equal(full_grads[n], cached_grads[n]) for n in full_grads)
    # The frozen prefix (embeddings shared with a decoder included) got no gradient.
    frozen = {id(p) for m in adapter.frozen_modules(start) for p in m.parameters()}
    assert all(id(p) not in frozen for n, p in model.named_parameters() if n in full_grads)


def test_mpnet_relative_position_bias_is_frozen_with_block_zero_and_still_read():
    """MPNet's encoder turns one table into the position bias of every layer: block 0's output
    (what the cache stores) depends on it, so it freezes with block 0, and the trainable blocks
    read it, so running from block k must not skip it as it skips the embeddings."""
    model, batch = task_model("seq-mpnet")
    adapter = ModelAdapter(model)
    table = model.mpnet.encoder.relative_attention_bias
    assert table.weight.requires_grad
    model.train()
    adapter.set_frozen(2)
    assert not table.weight.requires_grad and any(m is table for m in adapter.frozen_modules(1))
    hidden = adapter.hidden_before(2, model_inputs(batch))
    loss, _ = loss_and_grads(model, batch, lambda: adapter.run_from(2, hidden))
    assert table.weight.grad is None  # so no optimizer step moves the cached prefix's output
    with torch.no_grad():
        table.weight.normal_()  # not a constant shift: the softmax would not see it
    # Had it trained, the stored output would be stale; and the cached path reads its new value.
    assert not torch.equal(adapter.hidden_before(2, model_inputs(batch)), hidden)
    moved, _ = loss_and_grads(model, batch, lambda: adapter.run_from(2, hidden))
    assert not torch.equal(moved, loss)


def test_encoder_decoder_freezes_encoder_blocks_and_shared_embedding_only():
    for kind in ("bart", "t5"):
        model, _ = task_model(kind)
        adapter = ModelAdapter(model)
        adapter.set_frozen(3)
        decoder = model.get_decoder()
        shared = model.get_input_embeddings().weight
        assert not shared.requires_grad  # the decoder's token embedding is the same parameter
        assert all(p.requires_grad for n, p in decoder.named_parameters() if "embed_tokens" not in n)


@pytest.mark.parametrize("stage", [0, 3])
@pytest.mark.parametrize("kind", ["gpt2-lm", "llama-tied-lm", "llama-lm"])
def test_tied_lm_head_freezes_with_the_embeddings_an_untied_one_trains(kind, stage):
    """A tied LM head is the input embedding matrix: it freezes with block 0 (the frozen prefix's
    output must stay a pure function of the input), weight decay included, also where ZeRO-3
    partitions the shared weight. An untied head, the final norm and the trainable blocks keep
    training."""
    import deepspeed
    import ds_autofreeze
    model, batch = task_model(kind)
    head, embedding = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    tied = kind != "llama-lm"
    assert (head is embedding) == tied
    config = ds_config(stage, lr=1e-2)
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # ZeRO-3: partition every weight
    engine, *_, af = ds_autofreeze.initialize(model=model, config=config)
    af.freeze(2)

    def weights() -> dict[int, torch.Tensor]:
        with deepspeed.zero.GatheredParameters(list(model.parameters()), enabled=stage == 3):
            return {id(p): p.detach().clone() for p in model.parameters()}

    before = weights()
    for _ in range(2):
        engine.backward(engine(**batch).loss)
        engine.step()
    moved = {i for i, w in weights().items() if not torch.equal(w, before[i])}
    assert id(embedding) not in moved and (id(head) in moved) == (not tied)
    final_norm = model.base_model.get_submodule("ln_f" if kind == "gpt2-lm" else "norm")
    assert all(id(p) in moved for p in [*af.adapter.blocks[2].parameters(), *final_norm.parameters()])
    af.close()
