"""What a freeze does to gradient clipping (docs/deciders.md, "Freezing also changes the clipping").

    python bench/clipping.py record --task qa --seed 42 --steps 110   # full fine-tuning to step 110, recorded
    python bench/clipping.py report                                    # the table, from every record

- record: full fine-tuning (launch/finetune.py in this process, bench/decider_study.py's task
  settings, nothing frozen) with DeepSpeed's ZeRO-0 clipping wrapped to write, at each step, the
  global gradient norm before clipping and the share of its square in the embeddings + first 1 / 2 / 4
  blocks (what a freeze of those blocks would take out of the norm). It stops at --steps. Writes
  bench/results/decider_study/clipping-<task><seed>.jsonl.
- report: for each record, the steps after 55% of the run (about where the shipped rule froze QA and
  multiple choice): how often the norm was clipped, and the ratio of the clip factor the staying
  parameters would get with k blocks frozen to the one they got, with the threshold kept (what a
  freeze did before ``rescale_clipping``), rescaled as ``rescale_clipping`` does by default (by the
  staying share of the squared clipped gradient before the freeze, which Adam's second moments
  average), and rescaled by that share over the last decision interval only (``rescale_from``
  "interval": the run's steps / 20, the shipped ``num_intervals``). The "energy" ratio is that of the
  staying parameters' summed squared clipped gradients after the freeze.
  Prints a table and writes bench/results/decider_study/clipping.json.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import runpy
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import decider_study as study  # noqa: E402

PREFIX = os.path.join(study.OUT, "clipping-")
TOTAL_STEPS = {"imdb": 375, "qa": 174, "mc": 62}  # bench/decider_study.py's runs
FREEZE_AT = 0.55
DECISIONS = 20  # the shipped num_intervals: an interval is total // 20 steps
BLOCKS = (1, 2, 4)


def record(task: str, seed: int, steps: int) -> None:
    from deepspeed.runtime.engine import DeepSpeedEngine

    from ds_autofreeze.model_adapter import ModelAdapter

    os.makedirs(study.OUT, exist_ok=True)
    path = f"{PREFIX}{task}{seed}.jsonl"
    log = open(path, "w")
    clip = DeepSpeedEngine.clip_fp32_gradients

    def recorded(engine: DeepSpeedEngine) -> None:
        if not hasattr(engine, "_front_ids"):
            adapter = ModelAdapter(engine.module)
            engine._front_ids = [{id(p) for m in adapter.frozen_modules(k) for p in m.parameters()} for k in BLOCKS]
        total, front = 0.0, [0.0] * len(BLOCKS)
        for p in engine.module.parameters():
            if p.grad is not None:
                sq = float(p.grad.float().pow(2).sum())
                total += sq
                for i, ids in enumerate(engine._front_ids):
                    front[i] += sq if id(p) in ids else 0.0
        step = engine.global_steps + 1
        log.write(json.dumps({"step": step, "norm": total ** 0.5,
                              **{f"share{k}": s / total for k, s in zip(BLOCKS, front)}}) + "\n")
        log.flush()
        if step >= steps:
            os._exit(0)  # the record is complete; the rest of the run would only cost time
        clip(engine)

    DeepSpeedEngine.clip_fp32_gradients = recorded
    args, extra = study.task_args(task, seed, tempfile.mkdtemp())
    with tempfile.TemporaryDirectory() as configs:
        config = study.section_config({"decider": {"name": "snr", "min_trainable": study.NUM_BLOCKS}}, configs, "full",
                                     task)
        sys.argv = ["finetune.py", "--deepspeed_config", config, "--output_dir", args.out,
                    "--max_train_samples", str(args.max_train_samples), "--max_eval_samples", str(args.max_eval_samples),
                    "--max_seq_length", str(args.max_seq_length), "--num_train_epochs", str(args.num_train_epochs),
                    "--seed", str(seed), "--no_progress", *extra]
        runpy.run_path(os.path.join(ROOT, "launch", "finetune.py"), run_name="__main__")


def analyse(path: str) -> list[dict]:
    name = path[len(PREFIX):-len(".jsonl")]
    task = name.rstrip("0123456789")
    rows = [json.loads(line) for line in open(path)]
    norm, step = np.array([r["norm"] for r in rows]), np.array([r["step"] for r in rows])
    total = TOTAL_STEPS[task]
    before, after = (step > 0.06 * total) & (step <= FREEZE_AT * total), step > FREEZE_AT * total
    full = np.minimum(1.0, 1.0 / norm)  # the clip factor of full fine-tuning (threshold 1.0)
    clipped_sq = (norm * full) ** 2
    out = []
    for k in BLOCKS:
        share = np.array([r[f"share{k}"] for r in rows])
        frozen_share = float((share[before] * clipped_sq[before]).sum() / clipped_sq[before].sum())
        # rescale_from "interval": the share over the last decision interval before the freeze.
        last = (step > FREEZE_AT * total - total // DECISIONS) & (step <= FREEZE_AT * total)
        recent_share = float((share[last] * clipped_sq[last]).sum() / clipped_sq[last].sum())
        staying = norm * np.sqrt(1 - share)
        for used, label in ((0.0, "kept"), (frozen_share, "rescaled"), (recent_share, "rescaled, last interval")):
            threshold = np.sqrt(1 - used)
            factor = np.minimum(1.0, threshold / staying)[after]
            ratio = factor / full[after]
            energy = (factor ** 2 * staying[after] ** 2).sum() / (full[after] ** 2 * staying[after] ** 2).sum()
            out.append({"run": name, "blocks": k, "threshold": label, "steps": int(after.sum()),
                        "clipped": float((norm[after] > 1).mean()), "median_norm": float(np.median(norm[after])),
                        "frozen_share": frozen_share, "share_used": used, "ratio_median": float(np.median(ratio)),
                        "ratio_mean": float(ratio.mean()), "ratio_p90": float(np.percentile(ratio, 90)),
                        "energy": float(energy)})
    return out


def report() -> None:
    rows = [r for path in sorted(glob.glob(f"{PREFIX}*.jsonl")) for r in analyse(path)]
    print("| run | k frozen | threshold | steps after 55% | clipped | median norm | frozen share (6-55%) / rescaled by | "
          "clip factor ratio median / mean / p90 | energy ratio |\n|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['blocks']} | {r['threshold']} | {r['steps']} | {r['clipped']:.2f} | "
              f"{r['median_norm']:.2f} | {r['frozen_share']:.2f} / {r['share_used']:.2f} | {r['ratio_median']:.2f} / {r['ratio_mean']:.2f} / "
              f"{r['ratio_p90']:.2f} | {r['energy']:.2f} |")
    with open(os.path.join(study.OUT, "clipping.json"), "w") as f:
        json.dump(rows, f, indent=1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("record")
    r.add_argument("--task", choices=list(TOTAL_STEPS), required=True)
    r.add_argument("--seed", type=int, default=42)
    r.add_argument("--steps", type=int, required=True, help="stop after this optimizer step")
    sub.add_parser("report")
    args = p.parse_args()
    if args.command == "record":
        record(args.task, args.seed, args.steps)
    else:
        report()


if __name__ == "__main__":
    main()
