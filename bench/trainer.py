"""Trainer path vs launcher path: the same fine-tuning through Hugging Face's Trainer + AutoFreezeCallback
(launch/trainer.py) and through launch/finetune.py, in bench/compare.py's setting.

    python bench/trainer.py                  # MiniLM-L6, IMDb 4,000 / 5,000, 3 epochs, batch 32, seed 42
    python bench/trainer.py --seeds 42 43 44 # the accuracy spread over seeds, both paths
    python bench/trainer.py --max_train_samples 320 --max_eval_samples 200 --num_train_epochs 1   # a quick look
    python bench/trainer.py --reuse          # go on after a stop: runs that finished are read back
    python bench/trainer.py --reuse --twin   # + both paths on the same training (bench/trainer_twin.py)

Both run AutoFreeze (the shipped `snr` rule) with the activation cache: configs/autofreeze_cache.json, and its
Trainer twin configs/trainer_autofreeze_cache.json (the same values, "auto" where the Trainer sets
them; the Trainer's warmup is given the launcher's step count). Runs go one after another (on 2
cores a parallel run would distort both timings); each is about 30 minutes here at the full size.
Three questions, answered in the summary:

- Same freeze steps? Not expected to be exact: the paths differ in data order (the Trainer's
  sampler against the launcher's per-rank shards), in the dropout stream, and the Trainer hands
  DeepSpeed's optimizer one parameter group (weight decay on biases and norms too); how early the
  rule freezes depends on the dropout stream (README). With ``--twin`` (first seed) the question is
  asked on the same training: the launcher with fixed-length padding against bench/trainer_twin.py,
  the Trainer taking the launcher's side of those three choices; the summary gives their freeze
  steps and the largest relative difference of any statistic logged at any decision.
- Accuracy within the seed spread? Per seed, |trainer - launcher| against the spread (max - min)
  of the launcher's accuracies over --seeds; with one seed, against --seed_spread.
- Trainer overhead <= 5%? The ratio of training times (evaluation and checkpoints excluded on
  both) at the same work: when the freeze steps differ, both paths run again (first seed) with the
  launcher's freeze steps as a fixed schedule (the ``schedule`` decider), and those are compared.

Prints a markdown table and the summary; writes <out>.json (default bench/results/trainer.json),
the runs' outputs under <out>/.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

from compare import ROOT, bench_parser, load_config, run_command, run_one, write_config

LAUNCHER_CONFIG = "configs/autofreeze_cache.json"
TRAINER_CONFIG = "configs/trainer_autofreeze_cache.json"
BATCH = 32  # both configs' micro-batch; one process, no accumulation
WARMUP = 0.06  # configs/autofreeze_cache.json's warmup_num_steps, a fraction of the run
OVERHEAD_LIMIT = 1.05
TWIN_ARGS = ("--optim", "adamw_torch")  # the plain AdamW DeepSpeed's torch_adam builds (bench/trainer_twin.py)


def total_steps(args: argparse.Namespace) -> int:
    """Optimizer steps of a run on either path."""
    return args.max_train_samples // BATCH * args.num_train_epochs


def run_trainer(name: str, config: str, args: argparse.Namespace, seed: int, script: str = "launch/trainer.py",
                extra: tuple[str, ...] = ()) -> dict:
    """One run of launch/trainer.py (or of ``script`` taking its arguments); its all_results.json plus wall time."""
    out_dir = os.path.join(args.out, name)
    # launch/finetune.py's warmup: a fraction of the run, rounded (the Trainer would round up).
    warmup = max(1, round(WARMUP * total_steps(args)))
    cmd = [sys.executable, os.path.join(ROOT, script), "--deepspeed_config", os.path.join(ROOT, config),
           "--output_dir", out_dir, "--max_train_samples", str(args.max_train_samples),
           "--max_eval_samples", str(args.max_eval_samples), "--max_seq_length", str(args.max_seq_length),
           "--num_train_epochs", str(args.num_train_epochs), "--per_device_train_batch_size", str(BATCH),
           "--warmup_steps", str(warmup), "--seed", str(seed), "--save_strategy", "no", "--no_progress", *extra]
    result = run_command(name, cmd, out_dir, args.reuse,
                         env={**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")})
    print(f"[{name}] accuracy {result['eval_accuracy']:.4f}, train {result['train_runtime']:.1f}s, "
          f"frozen {result['final_frozen_blocks']}", flush=True)
    return result


def with_schedule(path: str, events: list[dict], steps: int, directory: str, name: str) -> str:
    """``path`` with its decider replaced by a fixed schedule freezing at ``events``' steps (no freezing
    for none); the path written."""
    config = load_config(path)
    if events:
        config["autofreeze"]["decider"] = {"name": "schedule", "schedule": [
            {"fraction": e["step"] / steps, "num_frozen_blocks": e["frozen_blocks"]} for e in events]}
    else:
        config["autofreeze"]["enabled"] = False
    return write_config(config, directory, name)


def twin_config(directory: str) -> str:
    """The Trainer's JSON without its "optimizer" section (bench/trainer_twin.py: the Trainer then builds
    torch's AdamW over its own decay groups); the path written."""
    config = load_config(TRAINER_CONFIG)
    del config["optimizer"]
    return write_config(config, directory, "trainer-twin")


def statistics_difference(a: dict, b: dict) -> Optional[float]:
    """The largest relative difference between two runs' statistics over all decisions and blocks
    (None when their decisions do not pair up step for step)."""
    if [d["step"] for d in a["decisions"]] != [d["step"] for d in b["decisions"]]:
        return None
    worst = 0.0
    for x, y in zip(a["decisions"], b["decisions"]):
        for key, values in x["stats"].items():
            if isinstance(values, list):
                worst = max([worst, *(abs(u - v) / max(abs(u), abs(v), 1e-30) for u, v in zip(values, y["stats"][key])
                                      if u is not None and v is not None)])
    return worst


def freezes(result: dict) -> str:
    return ", ".join(f"{e['frozen_blocks']}@{e['step']}" for e in result["freeze_events"]) or "none"


def table(results: dict[str, dict]) -> str:
    rows = ["| run | eval accuracy | train time (s) | frozen blocks (k@step) | cache hit rate |",
            "|---|---|---|---|---|"]
    for name, r in results.items():
        cache = r.get("cache") or {}
        hit = f"{cache['stats']['hit_rate']:.3f}" if cache.get("stats") else "n/a"
        rows.append(f"| {name} | {r['eval_accuracy']:.4f} | {r['train_runtime']:.1f} | {freezes(r)} (of "
                    f"{r['num_blocks']}) | {hit} |")
    return "\n".join(rows)


def summarize(results: dict[str, dict], seeds: list[int], seed_spread: float,
              overhead: Optional[tuple[str, str]]) -> dict:
    """The three answers (module doc), from the runs."""
    launcher = {s: results[f"launcher seed{s}"] for s in seeds}
    trainer = {s: results[f"trainer seed{s}"] for s in seeds}
    accuracies = [r["eval_accuracy"] for r in launcher.values()]
    spread = max(accuracies) - min(accuracies) if len(seeds) > 1 else seed_spread
    deltas = {s: trainer[s]["eval_accuracy"] - launcher[s]["eval_accuracy"] for s in seeds}
    base, other = overhead or (f"launcher seed{seeds[0]}", f"trainer seed{seeds[0]}")
    ratio = results[other]["train_runtime"] / results[base]["train_runtime"]
    return {
        "same_freeze_steps": {s: freezes(trainer[s]) == freezes(launcher[s]) for s in seeds},
        "accuracy_delta": deltas,
        "seed_spread": spread,
        "seed_spread_from": "launcher runs over --seeds" if len(seeds) > 1 else "--seed_spread",
        "accuracy_within_spread": {s: abs(d) <= spread for s, d in deltas.items()},
        "overhead_runs": [base, other],
        "train_time_ratio": ratio,
        "overhead_within_5_percent": ratio <= OVERHEAD_LIMIT,
    }


def summary_lines(summary: dict) -> str:
    lines = []
    for seed, same in summary["same_freeze_steps"].items():
        delta = summary["accuracy_delta"][seed]
        lines.append(f"- seed {seed}: same freeze steps: {'yes' if same else 'no'}; accuracy trainer - launcher "
                     f"{100 * delta:+.2f} pt, {'within' if summary['accuracy_within_spread'][seed] else 'outside'} "
                     f"the seed spread {100 * summary['seed_spread']:.2f} pt ({summary['seed_spread_from']})")
    base, other = summary["overhead_runs"]
    lines.append(f"- Trainer overhead: train time {other} / {base} = {summary['train_time_ratio']:.3f} "
                 f"({'within' if summary['overhead_within_5_percent'] else 'over'} 5%)")
    if "twin" in summary:
        twin, diff = summary["twin"], summary["twin"]["max_statistic_difference"]
        lines.append(f"- same training (--twin): same freeze steps: {'yes' if twin['same_freeze_steps'] else 'no'}; "
                     f"accuracy trainer - launcher {100 * twin['accuracy_delta']:+.2f} pt; largest relative "
                     f"difference of a logged statistic: {'decisions differ' if diff is None else f'{diff:.1e}'}")
    return "\n".join(lines)


def main() -> None:
    p = bench_parser(__doc__, "trainer")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="seeds to run both paths with (default: --seed)")
    p.add_argument("--seed_spread", type=float, default=0.0080,
                   help="accuracy spread to compare against with one seed (default: full fine-tuning's over seeds "
                        "42-44 in this setting, docs/deciders.md: 0.80 pt)")
    p.add_argument("--twin", action="store_true",
                   help="also both paths on the same training, first seed (module doc)")
    args = p.parse_args()
    seeds = args.seeds or [args.seed]
    if args.max_train_samples % BATCH:
        # The launcher trains whole batches only, the Trainer its last partial batch too (evaluating
        # every example needs its dataloader_drop_last off): the same work needs whole batches.
        p.error(f"--max_train_samples must be a multiple of the batch size {BATCH}, got {args.max_train_samples}")

    results: dict[str, dict] = {}
    for seed in seeds:
        results[f"launcher seed{seed}"] = run_one(f"launcher-seed{seed}", LAUNCHER_CONFIG, args,
                                                  extra=["--seed", str(seed)])
        results[f"trainer seed{seed}"] = run_trainer(f"trainer-seed{seed}", TRAINER_CONFIG, args, seed)
    overhead = None
    first = results[f"launcher seed{seeds[0]}"]
    # Configs written for runs below sit beside the runs, not in a temporary directory: the same
    # config gives the same command, so --reuse finds these runs too.
    configs = os.path.join(args.out, "configs")
    os.makedirs(configs, exist_ok=True)
    if freezes(first) != freezes(results[f"trainer seed{seeds[0]}"]):
        # Train times compare only at the same work: both paths again, freezing where the launcher did.
        events, steps = first["freeze_events"], total_steps(args)
        results["launcher (launcher's freezes)"] = run_one(
            "launcher-schedule", with_schedule(LAUNCHER_CONFIG, events, steps, configs, "launcher"), args,
            extra=["--seed", str(seeds[0])])
        results["trainer (launcher's freezes)"] = run_trainer(
            "trainer-schedule", with_schedule(TRAINER_CONFIG, events, steps, configs, "trainer"), args, seeds[0])
        overhead = ("launcher (launcher's freezes)", "trainer (launcher's freezes)")
    if args.twin:
        results["launcher, fixed padding"] = run_one("launcher-padded", LAUNCHER_CONFIG, args,
                                                     extra=["--seed", str(seeds[0]), "--pad_to_max_length"])
        results["trainer twin"] = run_trainer("trainer-twin", twin_config(configs), args, seeds[0],
                                              script="bench/trainer_twin.py", extra=TWIN_ARGS)

    summary = summarize(results, seeds, args.seed_spread, overhead)
    if args.twin:
        a, b = results["launcher, fixed padding"], results["trainer twin"]
        summary["twin"] = {"same_freeze_steps": freezes(a) == freezes(b),
                           "accuracy_delta": b["eval_accuracy"] - a["eval_accuracy"],
                           "train_loss": [a["train_loss"], b["train_loss"]],
                           "max_statistic_difference": statistics_difference(a, b)}
    md = table(results)
    print("\n" + md + "\n\n" + summary_lines(summary))
    path = args.out + ".json"
    with open(path, "w") as f:
        json.dump({"command": " ".join(sys.argv), "settings": {**vars(args), "seeds": seeds}, "results": results,
                   "table": md, "summary": summary}, f, indent=1)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
