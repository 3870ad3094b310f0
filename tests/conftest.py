import csv
import json
import os
import random
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


def clip_rescale(opt: torch.optim.Optimizer, before: list, previous: dict | None = None) -> float:
    """What ``rescale_clipping`` multiplies the clipping threshold by at a freeze, for a plain torch
    Adam(W) reference: sqrt(the staying parameters' share of ``before``'s summed exp_avg_sq), or with
    ``previous`` (each parameter's exp_avg_sq at the last decision, ``rescale_from`` "interval") of its
    change since: exp_avg_sq - b2^K previous, K the steps between."""
    b2 = opt.param_groups[0]["betas"][1]

    def v(params):
        total = 0.0
        for p in params:
            state = opt.state[p]
            now = state["exp_avg_sq"].double()
            if previous is not None:
                now = now - b2 ** (int(state["step"]) - previous["step"]) * previous[p].double()
            total += now.sum().item()
        return total
    return (v([p for p in before if p.requires_grad]) / v(before)) ** 0.5


def adam_reading(opt: torch.optim.Optimizer, params: list, step: int) -> dict:
    """Each parameter's exp_avg_sq at optimizer step ``step``: ``clip_rescale``'s ``previous``."""
    return {"step": step, **{p: opt.state[p]["exp_avg_sq"].clone() for p in params}}


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


# launch/finetune.py as a user runs it: a tiny model and data files on disk (tests/test_finetune.py,
# tests/test_slurm.py).
WORDS_POS = ["great", "good", "fine", "superb", "love", "fun"]
WORDS_NEG = ["bad", "awful", "poor", "boring", "hate", "dull"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A 4-block random BERT and a word-level tokenizer, saved as a user's local model would be."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast
    path = tmp_path_factory.mktemp("tiny_bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS_POS, *WORDS_NEG, "the", "movie", "was"]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(path / "vocab.txt")).save_pretrained(path)
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=4,
                                             num_attention_heads=2, intermediate_size=64,
                                             max_position_embeddings=64)).save_pretrained(path)
    return str(path)


def write_csv(path, n, seed, label_fn=lambda y: y):
    rng = random.Random(seed)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for _ in range(n):
            y = rng.randint(0, 1)
            words = rng.choices(WORDS_POS if y else WORDS_NEG, k=3) + ["the", "movie", "was"]
            rng.shuffle(words)
            w.writerow([" ".join(words), label_fn(y)])
    return str(path)


@pytest.fixture(scope="session")
def data_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    return write_csv(d / "train.csv", 96, 1), write_csv(d / "dev.csv", 40, 2)


def script_env(**extra: str) -> dict:
    """os.environ for a script the test launches: without this process's torch.distributed variables
    (the script or its launcher sets its own world), DeepSpeed on CPU, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT",
                                                             "MASTER_ADDR")}
    return {**env, "DS_ACCELERATOR": "cpu", **extra}


def write_config(path, autofreeze=None, **extra):
    config = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
              "steps_per_print": 10 ** 6,
              "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.01, "torch_adam": True}},
              "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": 3e-3,
                                                                "warmup_num_steps": 0.1, "total_num_steps": "auto"}},
              "zero_optimization": {"stage": 1}, **extra}
    if autofreeze is not None:
        config["autofreeze"] = autofreeze
    path.write_text(json.dumps(config))
    return str(path)
