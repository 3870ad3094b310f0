import os
import socket

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session", autouse=True)
def single_rank_env():
    """A world of one for in-process engines: the process group is created once per session."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    torch.set_num_threads(1)  # tiny models: threads only add noise and contention with other tests
    yield


def tiny_bert(num_layers: int = 4, seed: int = 0, dropout: float = 0.1, num_labels: int = 2):
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=num_layers, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, num_labels=num_labels,
                     hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    return BertForSequenceClassification(cfg)


def ds_config(stage: int = 0, autofreeze: dict | None = None, lr: float = 1e-3, micro: int = 4, accum: int = 1,
              scheduler: dict | None = None) -> dict:
    config = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": 1.0,
        "steps_per_print": 10 ** 6,
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "weight_decay": 0.01, "torch_adam": True}},
        "zero_optimization": {"stage": stage},
    }
    if scheduler:
        config["scheduler"] = scheduler
    if autofreeze is not None:
        config["autofreeze"] = autofreeze
    return config


def batches(n: int, micro: int = 4, seq: int = 12, vocab: int = 120, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, vocab, (micro, seq), generator=g)
        mask = torch.ones_like(ids)
        mask[:, seq - 3:] = torch.randint(0, 2, (micro, 3), generator=g)  # some padding
        out.append({"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 2, (micro,), generator=g)})
    return out
