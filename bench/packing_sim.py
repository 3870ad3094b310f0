"""Replay freeze timelines on simulated clusters with the packing cost model (docs/packing.md).

    python bench/packing_sim.py

Two settings:
- paper: BERT-base on 64 GPUs (8 nodes x 8), AG News-sized (120,000 examples, global batch
  1,024, 3 epochs). The cluster is calibrated to the paper's numbers: one iteration takes
  0.29 s on one node and 8.9 s on 64 GPUs with the same per-GPU batch (16), the difference
  being communication. Price: $3.06 per GPU-hour (a p3.16xlarge's eighth).
- here: the packaged MiniLM-L6 on this machine's 2 CPU workers, with the step time and gloo
  bandwidth measured here and the freeze timeline bench/compare.py measured.
For each: no freezing, freezing only (same workers), Performance Packing, Efficiency Packing
(without a deadline, and with the no-freezing run's time as the deadline).
Prints a markdown table; writes bench/results/packing_sim.json and packing_sim.png.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ds_autofreeze.packing import (Cluster, Workload, allreduce_seconds, timeline_seconds,  # noqa: E402
                                   transformer_activation_bytes, uniform_blocks)

BERT_BASE = dict(num_blocks=12, block_params=7_087_872, embedding_params=23_837_184, head_params=593_668)
MINILM = dict(num_blocks=6, block_params=1_774_464, embedding_params=12_067_968, head_params=148_610)


def paper_setting(args: argparse.Namespace, timeline: tuple = ((0.40, 6), (0.49, 8), (0.59, 10))
                  ) -> tuple[Workload, Cluster, list, int, int]:
    global_batch, per_gpu = 1024, 16
    grad_bytes = 4 * (BERT_BASE["num_blocks"] * BERT_BASE["block_params"] + BERT_BASE["embedding_params"]
                      + BERT_BASE["head_params"])
    intra = 50e9  # NVLink-class all-reduce inside a node (its share of 0.29 s is small either way)
    one_node = Cluster(max_workers=64, workers_per_node=8, intra_node_bytes_per_second=intra,
                       inter_node_bytes_per_second=intra)
    example_seconds = (0.29 - allreduce_seconds(one_node, 8, grad_bytes)) / per_gpu
    # 8.9 s at 64 GPUs = the same compute + a ring all-reduce across nodes: solve for its bandwidth.
    comm_64 = 8.9 - per_gpu * example_seconds
    inter = 2 * 63 * grad_bytes / 64 / comm_64
    cluster = Cluster(max_workers=64, workers_per_node=8, intra_node_bytes_per_second=intra,
                      inter_node_bytes_per_second=inter, worker_memory_bytes=16e9, worker_price_per_hour=3.06,
                      restart_seconds=args.restart_seconds)
    work = uniform_blocks(global_batch, example_seconds=example_seconds,
                          activation_bytes=transformer_activation_bytes(128, 768, 12, 4), **BERT_BASE)
    total_steps = 3 * (120_000 // global_batch)
    freezes = [(round(f * total_steps), k) for f, k in timeline]
    return work, cluster, freezes, total_steps, 64


def here_setting(args: argparse.Namespace) -> tuple[Workload, Cluster, list, int, int]:
    # Measured on this machine (DESIGN.md; bench/compare.py): a full step of 32 examples takes
    # 2,028 ms in one process; gloo all-reduce between two ranks reaches ~1.3 GB/s.
    cluster = Cluster(max_workers=2, workers_per_node=2, intra_node_bytes_per_second=1.3e9,
                      inter_node_bytes_per_second=1.3e9, worker_price_per_hour=1.0,
                      restart_seconds=args.restart_seconds)
    work = uniform_blocks(32, example_seconds=2.028 / 32, activation_bytes=transformer_activation_bytes(128, 384, 12, 4),
                          cached_prefix=True, **MINILM)
    return work, cluster, [(90, 1), (108, 2), (126, 4)], 375, 2


def simulate(work: Workload, cluster: Cluster, freezes: list, total_steps: int, workers: int) -> dict:
    runs = {"no freezing": timeline_seconds("performance", work, cluster, [], total_steps, workers, pack=False),
            "freezing only": timeline_seconds("performance", work, cluster, freezes, total_steps, workers, pack=False),
            "performance packing": timeline_seconds("performance", work, cluster, freezes, total_steps, workers),
            "efficiency packing": timeline_seconds("efficiency", work, cluster, freezes, total_steps, workers)}
    base = runs["no freezing"]
    # The same, told to finish no later than training without freezing would.
    runs["efficiency, deadline = no-freezing time"] = timeline_seconds(
        "efficiency", work, cluster, freezes, total_steps, workers, deadline_seconds=base["seconds"])
    for r in runs.values():
        r["speedup"] = base["seconds"] / r["seconds"]
        r["cost_reduction"] = base["cost"] / r["cost"]
    return runs


def table(name: str, runs: dict) -> str:
    lines = [f"{name}", "", "| run | time (h) | cost | speedup | cost reduction | workers over the run |",
             "|---|---|---|---|---|---|"]
    for run, r in runs.items():
        workers = " -> ".join(dict.fromkeys(f"{s['workers']}x{s['micro_batch']}x{s['accumulation']}"
                                            for s in r["segments"]))
        lines.append(f"| {run} | {r['seconds'] / 3600:.3f} | {r['cost']:.3f} | {r['speedup']:.2f}x | "
                     f"{r['cost_reduction']:.2f}x | {workers} |")
    return "\n".join(lines)


def plot(results: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4))
    for ax, (name, runs) in zip(axes, results.items()):
        for run, r in runs.items():
            xs, ys, t = [], [], 0.0
            for seg, nxt in zip(r["segments"], r["segments"][1:] + [None]):
                end = nxt["from_step"] if nxt else r["total_steps"]
                xs += [t / 3600]
                t += (end - seg["from_step"]) * seg["step_seconds"]
                xs += [t / 3600]
                ys += [seg["workers"]] * 2
            ax.plot(xs, ys, label=f"{run}: {r['seconds'] / 3600:.2f} h, cost {r['cost']:.2f}")
        ax.set_title(name)
        ax.set_xlabel("hours")
        ax.set_ylabel("workers")
        ax.set_yscale("log", base=2)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--restart_seconds", type=float, default=60.0, help="what one re-pack costs")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    args = p.parse_args()
    results, settings = {}, {}
    # Freeze timelines for the paper's cluster, as fractions of training -> frozen of 12 blocks:
    # the reference algorithm on IMDb (DESIGN.md: 3/4/5 of 6 blocks at 40/49/59%) and ours
    # (bench/compare.py: 1/2/4 of 6 at steps 90/108/126 of 375), both scaled to 12 blocks.
    reference = ((0.40, 6), (0.49, 8), (0.59, 10))
    ours = ((90 / 375, 2), (108 / 375, 4), (126 / 375, 8))
    for name, setting in (("paper cluster (BERT-base, 64 GPUs), reference timeline",
                           lambda a: paper_setting(a, reference)),
                          ("paper cluster (BERT-base, 64 GPUs), our timeline", lambda a: paper_setting(a, ours)),
                          ("here: MiniLM-L6, 2 CPU workers, IMDb 4,000", here_setting)):
        work, cluster, freezes, total_steps, workers = setting(args)
        runs = simulate(work, cluster, freezes, total_steps, workers)
        for r in runs.values():
            r["total_steps"] = total_steps
        results[name] = runs
        settings[name] = {"freezes": freezes, "total_steps": total_steps, "start_workers": workers,
                          "cluster": cluster.__dict__, "example_seconds": 3 * sum(work.block_forward_seconds)}
        print(table(name, runs) + "\n")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "packing_sim.json"), "w") as f:
        json.dump({"settings": settings, "results": results}, f, indent=1)
    plot(results, os.path.join(args.out, "packing_sim.png"))
    print(f"written {os.path.join(args.out, 'packing_sim.json')} and packing_sim.png")


if __name__ == "__main__":
    main()
