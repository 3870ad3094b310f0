"""Ground truth for freeze deciders: what freezing k blocks at time t really costs, and which rule finds it.

    python bench/decider_study.py watch                  # full fine-tuning, every statistic logged, 3 seeds per task
    python bench/decider_study.py resume --seeds 42      # from the watch checkpoints: k blocks frozen at t, to the end
    python bench/decider_study.py replay                 # every decider setting on the logged statistics, scored
    python bench/decider_study.py confirm --name shipped # the shipped decider online, every task and seed
    python bench/decider_study.py scale                  # the gradient scale against Adam's v, per watch run

Tasks (the settings of bench/compare.py and bench/tasks.py, MiniLM-L6): ``imdb`` (4,000 / 5,000, 3 epochs,
375 steps), ``qa`` (SQuAD 2.0-style, 174 steps) and ``mc`` (SWAG-style, 62 steps), on which the shipped
setting was chosen; ``rt``, held out from that choice: the packaged Rotten Tomatoes sentences (one-sentence
reviews, another source and length than IMDb's; 6,530 / 2,000, 64 tokens, 2 epochs, 408 steps), given
to the launcher as CSV files, as a user's data would be, and ``rt-short``, its first 1,000 training
sentences (62 steps: a short run); ``mpnet``, only when named: the 12-block all-mpnet-base-v2
(``bash bench/setup_mpnet.sh`` first) on bench/mpnet.py's CPU setting (IMDb 2,000 / 2,000, 128 tokens,
2 epochs, 124 steps), where the question is how many of 12 blocks can go how early, and
``mpnet-lr5e-5``, the same at a peak learning rate of 5e-5 instead of the shipped configs' 2e-4.

- watch: ``launch/finetune.py`` with the ``snr`` decider told never to freeze (``min_trainable`` = all
  blocks) and ``log_statistics`` on: full fine-tuning, with every statistic (gradient moments, Adam's
  moments, the recent gradient scale, probe drift) logged at a fine interval, and checkpoints at
  20/40/60/80% of the run. Three seeds give the seed spread of full fine-tuning.
- resume: from those checkpoints, the run continues with the first k blocks frozen from that step on
  (a ``schedule`` decider, the cache on) and trains to the end: the real accuracy cost of freezing k
  blocks at t, paired with the watch run of the same seed (same data order and dropout before t).
- replay: feeds each watch run's logged statistics (merged to each decider's interval) through every
  decider setting of the grid, giving each setting's freeze schedule on each run; scores them with the
  resume grid (estimated accuracy cost) and a step-time model (estimated speedup); prints a table and
  writes replay.json (replay-TASK.json for tasks named apart from the default set). It decides at the
  multiple of the logged interval nearest to the setting's interval, so it is exact up to a setting's
  first freeze only where that multiple is the setting's own interval (later, real statistics would
  differ: frozen blocks change what the trainable ones see); otherwise it samples the same run at
  other steps (docs/deciders.md).
- scale: per watch run, each block's recent gradient scale against Adam's v over the run, and the
  adam estimator's per-step SNR against each (what ``adam_reference`` changes; prints, writes
  scale.json). Watch runs from before the recent scale was logged are skipped.
- confirm: a config run online on every task and seed, beside the watch runs' accuracy.
- progress: per watch run that logged each update's first-order progress (``UpdateProgress``), at each
  resume fraction the first k blocks' share of the training loss's first-order decrease over the tenth
  of the run before it, and in hindsight their share of the whole run's decrease still ahead, beside
  what freezing them there cost (the resume grid); prints, writes progress.json.

Runs (with checkpoints) go under bench/results/decider_study/runs/ (not committed); the summaries
(watch logs, resume and confirm results) are written as JSON next to it.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
from typing import Any, Iterator, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from compare import load_config, run_one, with_learning_rate, write_config  # noqa: E402
from mpnet import MPNET_DIR, require_model, write_data  # noqa: E402
from tasks import SETTINGS as TASK_SETTINGS  # noqa: E402

from ds_autofreeze.data import packaged_split  # noqa: E402
from ds_autofreeze.deciders import build_decider  # noqa: E402
from ds_autofreeze.statistics import BlockStats  # noqa: E402

OUT = os.path.join(ROOT, "bench", "results", "decider_study")
RESUME_DIR = OUT  # where replay finds the resume runs (and the watch runs they continued)
SEEDS = [42, 43, 44]
# name: (launch arguments, data sizes (train, eval, epochs), watch interval in steps, headline metric)
TASKS: dict[str, dict[str, Any]] = {
    "imdb": {"sizes": (4000, 5000, 3), "seq": 128, "interval": 5, "metric": "eval_accuracy", "task": None},
    "qa": {"sizes": (1000, 400, 2), "seq": 192, "interval": 3, "metric": "eval_f1", "task": "question_answering"},
    "mc": {"sizes": (1000, 400, 2), "seq": 64, "interval": 2, "metric": "eval_accuracy", "task": "multiple_choice"},
    "rt": {"sizes": (6530, 2000, 2), "seq": 64, "interval": 5, "metric": "eval_accuracy", "task": None,
           "source": "rotten_tomatoes"},
    "rt-short": {"sizes": (1000, 2000, 2), "seq": 64, "interval": 2, "metric": "eval_accuracy", "task": None,
                 "source": "rotten_tomatoes"},
    # The 12-block model (bench/mpnet.py's CPU setting): only when named, as it needs bench/setup_mpnet.sh.
    "mpnet": {"sizes": (2000, 2000, 2), "seq": 128, "interval": 3, "metric": "eval_accuracy", "task": None,
              "source": "imdb", "model": "mpnet", "blocks": 12},
}
# The same at BERT-base's usual learning rate (the top of BERT's recommended {2, 3, 5}e-5) instead of the MiniLM
# configs' 2e-4: whether freezing MPNet's first blocks early is free, or only undoes a too-high rate.
TASKS["mpnet-lr5e-5"] = {**TASKS["mpnet"], "lr": 5e-5}
DEFAULT_TASKS = [t for t in TASKS if "model" not in TASKS[t]]
SAVE_FRACTION = 0.1  # watch runs checkpoint every tenth of the run (launch/finetune.py --save_steps 0.1)
FRACTIONS = [0.1, 0.2, 0.4, 0.6, 0.8]
RESUME_BLOCKS = [2, 4]
NUM_BLOCKS = 6  # MiniLM-L6's; a task with another model names its own ("blocks")


def base_config() -> dict:
    return load_config("configs/autofreeze_cache.json")


def section_config(autofreeze: dict, directory: str, name: str, task: str) -> str:
    """configs/autofreeze_cache.json with ``autofreeze`` as its whole "autofreeze" section and the task's
    peak learning rate where it names one, written."""
    config = with_learning_rate({**base_config(), "autofreeze": autofreeze}, TASKS[task].get("lr"))
    return write_config(config, directory, name)


def task_args(task: str, seed: int, out: str) -> tuple[argparse.Namespace, list[str]]:
    """run_one's settings and the task's extra launch arguments (its data files, built once)."""
    spec = TASKS[task]
    train, evaluate, epochs = spec["sizes"]
    # reuse: off, as the study finds its finished runs itself (their all_results.json)
    args = argparse.Namespace(max_train_samples=train, max_eval_samples=evaluate, max_seq_length=spec["seq"],
                              num_train_epochs=epochs, seed=seed, out=out, reuse=False)
    data = os.path.join(OUT, "data")
    model: list[str] = []
    if spec.get("model") == "mpnet":
        model = ["--model_name_or_path", require_model(MPNET_DIR), "--ignore_mismatched_sizes"]  # a fresh head
    if "source" in spec:
        train_file, dev_file = write_data(os.path.join(data, task), train, evaluate, spec["source"])
        return args, [*model, "--train_file", train_file, "--validation_file", dev_file]
    if spec["task"] is None:
        return args, model
    build, ext, launch_args = TASK_SETTINGS[spec["task"]]
    os.makedirs(data, exist_ok=True)
    paths = [os.path.join(data, f"{task}_{split}.{ext}") for split in ("train", "dev")]
    if not all(os.path.isfile(p) for p in paths):
        train_reviews, held_out = packaged_split()
        build(train_reviews, train, 42, paths[0])  # the data is the same for every seed
        build(held_out, evaluate, 43, paths[1])
    return args, [*model, "--task", spec["task"], "--train_file", paths[0], "--validation_file", paths[1],
                  *launch_args]


def num_blocks(task: str) -> int:
    return TASKS[task].get("blocks", NUM_BLOCKS)


def run_dir(task: str, seed: int) -> str:
    return os.path.join(OUT, "runs", task, f"seed{seed}")


def watch(tasks: list[str], seeds: list[int]) -> None:
    with tempfile.TemporaryDirectory() as configs:
        for task, seed in itertools.product(tasks, seeds):
            summary = os.path.join(OUT, f"{task}-seed{seed}-watch.json")
            if os.path.isfile(summary):
                print(f"[{task} seed {seed}] watch: done before ({summary})")
                continue
            af = {"log_statistics": True, "probe_examples": 64,
                  "decider": {"name": "snr", "interval_steps": TASKS[task]["interval"],
                              "min_trainable": num_blocks(task)}}
            done = os.path.join(run_dir(task, seed), "watch", "all_results.json")
            if os.path.isfile(done):  # an interrupted study: the run itself finished
                with open(done) as f:
                    result = json.load(f)
            else:
                config = section_config(af, configs, f"watch-{task}", task)
                args, extra = task_args(task, seed, run_dir(task, seed))
                if os.path.isfile(os.path.join(run_dir(task, seed), "watch", "checkpoints", "latest")):
                    extra = [*extra, "--resume_from_checkpoint", "latest"]  # interrupted: its decision log is in the checkpoint
                result = run_one("watch", config, args,
                                 extra=[*extra, "--save_strategy", "steps", "--save_steps", str(SAVE_FRACTION)])
            with open(summary, "w") as f:
                json.dump(result, f)


def resume(tasks: list[str], seeds: list[int], fractions: list[float], blocks: list[int]) -> None:
    with tempfile.TemporaryDirectory() as configs:
        for task, seed in itertools.product(tasks, seeds):
            path = os.path.join(OUT, f"{task}-seed{seed}-resume.json")
            done = json.load(open(path)) if os.path.isfile(path) else {}
            with open(os.path.join(OUT, f"{task}-seed{seed}-watch.json")) as f:
                total = json.load(f)["train_steps"]
            checkpoints = os.path.join(run_dir(task, seed), "watch", "checkpoints")
            for fraction, k in itertools.product(fractions, blocks):
                name = f"{k}@{fraction}"
                step = round(fraction / SAVE_FRACTION) * max(1, round(SAVE_FRACTION * total))
                tag = os.path.join(checkpoints, f"step{step}")
                if name in done:
                    continue
                if not os.path.isdir(tag):
                    print(f"[{task} seed {seed}] no checkpoint at step {step} ({tag}); skipped")
                    continue
                finished = os.path.join(run_dir(task, seed), f"resume-{k}at{step}", "all_results.json")
                if os.path.isfile(finished):  # an interrupted study: the run itself finished
                    with open(finished) as f:
                        result = {"wall_seconds": None, **json.load(f)}
                else:
                    af = {"decider": {"name": "schedule", "min_trainable": 2,
                                      "schedule": [{"fraction": step / total, "num_frozen_blocks": k}]},
                          "cache": {"enabled": True}}
                    config = section_config(af, configs, f"resume-{task}", task)
                    args, extra = task_args(task, seed, run_dir(task, seed))
                    result = run_one(f"resume-{k}at{step}", config, args,
                                     extra=[*extra, "--resume_from_checkpoint", tag, "--save_strategy", "no"])
                done[name] = {key: result[key] for key in (TASKS[task]["metric"], "train_runtime", "freeze_events",
                                                           "epochs", "train_loss", "wall_seconds")}
                done[name]["step"] = step
                with open(path, "w") as f:
                    json.dump(done, f, indent=1)


def confirm(tasks: list[str], seeds: list[int], name: str, decider: dict[str, Any],
            section: Optional[dict[str, Any]] = None, reference: Optional[str] = None) -> None:
    """``decider`` (with the cache, and the other ``section`` keys of the "autofreeze" section) online on
    each task and seed, beside full fine-tuning of that seed (same data order and dropout): the run of
    confirm-``reference``.json where it has the seed (a ``static`` decider of 0 blocks is full
    fine-tuning without the watch run's statistics and checkpoints), else the watch run. Accuracy,
    freezes, train time."""
    section = section or {}
    reference_runs: dict[str, Any] = {}
    if reference:  # read first: a misspelt name should stop before the runs, not after them
        reference_path = os.path.join(OUT, f"confirm-{reference}.json")
        if not os.path.isfile(reference_path):
            raise SystemExit(f"--reference {reference}: no {reference_path} (make it with confirm --name {reference})")
        with open(reference_path) as f:
            reference_runs = json.load(f)["runs"]
    path = os.path.join(OUT, f"confirm-{name}.json")
    done = json.load(open(path)) if os.path.isfile(path) else {"decider": decider, "section": section, "runs": {}}
    if done["decider"] != decider or done.get("section", {}) != section:
        raise SystemExit(f"{path} holds runs of another setting ({done['decider']}, {done.get('section', {})}): "
                         "pick another --name")
    with tempfile.TemporaryDirectory() as configs:
        for task, seed in itertools.product(tasks, seeds):
            key = f"{task}/{seed}"
            if key in done["runs"]:
                continue
            finished = os.path.join(run_dir(task, seed), f"confirm-{name}", "all_results.json")
            if os.path.isfile(finished):
                with open(finished) as f:
                    result = {"wall_seconds": None, **json.load(f)}
            else:
                config = section_config({**section, "decider": decider, "cache": {"enabled": True}}, configs,
                                        f"confirm-{task}", task)
                args, extra = task_args(task, seed, run_dir(task, seed))
                result = run_one(f"confirm-{name}", config, args, extra=[*extra, "--save_strategy", "no"])
            metric = TASKS[task]["metric"]
            done["runs"][key] = {key_: result[key_] for key_ in (metric, "train_runtime", "freeze_events", "train_steps")}
            with open(path, "w") as f:
                json.dump(done, f, indent=1)
    print(f"| task / seed | {name} | full (run) | Δ (pt) | freezes (k@step of total) |\n|---|---|---|---|---|")
    paired: dict[str, list[tuple[float, float]]] = {}
    for key, r in done["runs"].items():
        task, seed = key.split("/")
        metric = TASKS[task]["metric"]
        watch_path = os.path.join(OUT, f"{task}-seed{seed}-watch.json")
        full, source = None, ""
        if key in reference_runs:
            full, source = reference_runs[key][metric], f"confirm-{reference}"
        elif os.path.isfile(watch_path):
            full, source = json.load(open(watch_path))[metric], "watch"
        delta = "" if full is None else f"{100 * (r[metric] - full):+.2f}"
        if full is not None:
            paired.setdefault(task, []).append((r[metric], full))
        events = ", ".join(f"{e['frozen_blocks']}@{e['step']}" for e in r["freeze_events"]) or "none"
        print(f"| {key} | {r[metric]:.4f} | {'' if full is None else f'{full:.4f} ({source})'} | {delta} | "
              f"{events} (of {r['train_steps']}) |")
    for task, pairs in paired.items():
        ours, full = (sum(x) / len(pairs) for x in zip(*pairs))
        print(f"| {task}, mean of {len(pairs)} | {ours:.4f} | {full:.4f} | {100 * (ours - full):+.2f} | |")


# Step time relative to a full step, MiniLM-L6 at batch 32 x 128 (DESIGN.md, measured here): k blocks
# frozen and run (a cache miss, or no cache) / frozen and served from the cache. Used only to rank
# settings in the replay; the confirm runs measure real speed.
STEP_TIME = {"run": {0: 1.0, 2: 1366 / 2028, 4: 985 / 2028, 5: 741 / 2028},
             "cached": {0: 1.0, 2: 1207 / 2028, 4: 584 / 2028, 5: 269 / 2028}}


def _interp(table: dict[float, float], x: float) -> float:
    keys = sorted(table)
    if x <= keys[0]:
        return table[keys[0]]
    if x >= keys[-1]:
        return table[keys[-1]]
    lo = max(k for k in keys if k <= x)
    hi = min(k for k in keys if k >= x)
    return table[lo] if lo == hi else table[lo] + (table[hi] - table[lo]) * (x - lo) / (hi - lo)


def estimated_speedup(events: list[tuple[int, int]], total: int, steps_per_epoch: int, cache: bool = True,
                      num_blocks: int = NUM_BLOCKS) -> float:
    """Full run time over the schedule's, from STEP_TIME: after a freeze, an example's frozen prefix
    runs until the cache has it (the next epoch at the latest), then is served. Another model's k of
    ``num_blocks`` is read as the same share of MiniLM's 6 (a rough model: its blocks' share of the
    step is not MiniLM's)."""
    boundary, moved_at, time = 0, 0, 0.0
    pending = list(events)
    for step in range(1, total + 1):
        if pending and step > pending[0][0]:
            moved_at, boundary = pending.pop(0)
        filling = not cache or step - moved_at <= steps_per_epoch
        time += _interp(STEP_TIME["run" if filling else "cached"], boundary * NUM_BLOCKS / num_blocks)
    return total / time


def replay(decisions: list[dict], total: int, warmup: int, config: dict, num_blocks: int = NUM_BLOCKS) -> list:
    """Freeze events (step, k) the decider ``config`` would have made on a watch run's logged
    statistics, the logged intervals merged to the multiple of them nearest to its own interval.
    Exact up to the first freeze where that multiple is its interval."""
    from ds_autofreeze.config import get_autofreeze_config
    records = [BlockStats.from_json(d["stats"]) for d in decisions]
    for r in records:
        # Logs from before Adam's step count was recorded: fp32 runs, where no step is skipped, so
        # it is the optimizer step.
        r.adam_step = r.step if r.adam_step is None else r.adam_step
    # Watch runs sum gradients over each logged interval; the adam estimator's own runs sum none
    # (steps 0), and their first decision step is their interval.
    logged = records[0].steps or records[0].step
    cfg = get_autofreeze_config({"autofreeze": {"total_steps": total, "decider": config}}).decider
    interval = config.get("interval_steps") or max(1, total // cfg.num_intervals)
    parts = max(1, round(interval / logged))
    cfg = cfg.model_copy(update={"interval_steps": parts * logged})
    decider = build_decider(cfg, num_blocks, total, warmup)
    boundary, events = 0, []
    for i, record in enumerate(records):
        if (i + 1) % parts:
            # What the decider reads between decisions (Adam's ratio in the warmup), at the logged
            # steps: the online run reads it after every step.
            if decider.reads_between(record.step):
                decider.decide(record.step, boundary, _without(record, boundary))
            continue
        merged = BlockStats.merge(records[i - parts + 1:i + 1])
        if boundary:  # frozen blocks have no statistics in a real run either
            merged = _without(merged, boundary)
        new = decider.decide(merged.step, boundary, merged)
        if new > boundary:
            events.append((merged.step, new))
            boundary = new
    return events


def _without(stats: BlockStats, boundary: int) -> BlockStats:
    out = BlockStats.from_json(stats.to_json())
    for name in ("grad_l1", "grad_sum_sq", "grad_sq_sum", "adam_m2", "adam_v", "drift"):
        values = getattr(out, name)
        if values is not None:
            setattr(out, name, [None if b < boundary else v for b, v in enumerate(values)])
    return out


def resume_grid(task: str, seed: int = 42) -> dict[tuple[int, float], float]:
    """(k, fraction) -> the headline score lost (points) by freezing k blocks at that fraction of the
    run, against the watch run of the same seed (same data order and dropout up to there), both from
    RESUME_DIR."""
    metric = TASKS[task]["metric"]
    path = os.path.join(RESUME_DIR, f"{task}-seed{seed}-resume.json")
    if not os.path.isfile(path):
        return {}
    with open(os.path.join(RESUME_DIR, f"{task}-seed{seed}-watch.json")) as f:
        watch = json.load(f)
    with open(path) as f:
        resumes = json.load(f)
    # Not rounded: a freeze replayed at the very step a resume froze must read that resume (72 / 124).
    return {(int(name.split("@")[0]), r["step"] / watch["train_steps"]): 100 * (watch[metric] - r[metric])
            for name, r in resumes.items()}


def estimated_cost(events: list[tuple[int, int]], total: int, grid: dict[tuple[int, float], float]) -> Optional[float]:
    """The points a schedule would cost, from the resume grid: its most costly event, each read at
    the nearest measured (k, fraction) with at least as many blocks and no later fraction (so an
    estimate errs on the costly side); None when the grid has no such point."""
    worst = 0.0
    for step, k in events:
        f = step / total
        cover = [(gk, gf) for gk, gf in grid if gk >= k and gf <= f + 1e-9]
        if not cover:
            return None
        nearest = max(cover, key=lambda point: (point[1], -point[0]))  # latest fraction, then fewest blocks
        worst = max(worst, grid[nearest])
    return worst


# The settings the replay scores: the noise-aware deciders around their defaults. The paper's rule is
# not replayable (the L1 norm of a summed gradient does not compose from shorter intervals); its real
# freezes are in the README's compare and task tables.
GRID: list[dict[str, Any]] = [
    *({"name": "snr", "estimator": e, "z": z, "confidence": c, "window": w, "patience": p, "num_intervals": n,
       "min_trainable": 2}
      for e in ("moments", "adam") for z in (0.5, 1.0) for c in (1.0, 2.0) for w in (3, 5) for p in (1, 2)
      for n in (10, 20)),
    *({"name": "snr", "estimator": "adam", "z": z, "min_trainable": m} for z in (0.5, 0.7, 1.0, 2.0) for m in (2, 3, 4)),
    *({"name": "drift", "tolerance": t, "min_trainable": 2} for t in (0.01, 0.02, 0.05)),
    # The shipped setting with its arm gate loosened (the 12-block model's first blocks never arm at 1).
    *({"name": "snr", "estimator": "adam", "arm": a, "min_trainable": m} for a in (1.0, 0.5, 0.25) for m in (0.67, 4)),
    # Adam's ratio against the recent gradient scale, not v (``scale`` below), at the shipped share.
    *({"name": "snr", "estimator": "adam", "adam_reference": "recent", "z": z, "arm": a, "min_trainable": 0.67}
      for z in (0.5, 1.0, 2.0) for a in (0.25, 0.5, 1.0)),
]
SCALE_FRACTIONS = [0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0]


def _watch_runs(tasks: list[str]) -> Iterator[tuple[str, int, dict[str, Any], list[BlockStats]]]:
    """(task, seed, summary, logged statistics) of each watch run in OUT."""
    for task, seed in itertools.product(tasks, SEEDS):
        path = os.path.join(OUT, f"{task}-seed{seed}-watch.json")
        if os.path.isfile(path):
            with open(path) as f:
                run = json.load(f)
            yield task, seed, run, [BlockStats.from_json(d["stats"]) for d in run["decisions"]]


def scale_table(tasks: list[str]) -> dict[str, Any]:
    """Per watch run and block, the recent gradient scale over Adam's v (both estimate E||g||^2; v over
    the whole run) at the decision nearest each of SCALE_FRACTIONS, and the adam estimator's per-step SNR
    against each, averaged over the run's second half: what ``adam_reference`` changes."""
    rows: dict[str, Any] = {}
    for task, seed, run, records in _watch_runs(tasks):
        if records[-1].grad_sq_recent is None:
            print(f"[{task} seed {seed}] logged before the recent scale was: skipped")
            continue
        total, blocks = run["train_steps"], run["num_blocks"]
        at = [min(records, key=lambda r: abs(r.step - f * total)) for f in SCALE_FRACTIONS]
        late = [r for r in records if r.step > total / 2]

        def mean(values: list[Optional[float]]) -> Optional[float]:
            values = [v for v in values if v is not None]
            return round(sum(values) / len(values), 4) if values else None

        rows[f"{task}/{seed}"] = {
            "steps": [r.step for r in at],
            "ratio": [[round(r.grad_sq_recent[b] / r.adam_v[b], 2) for r in at] for b in range(blocks)],
            "late_snr_v": [mean([r.adam_snr(b) for r in late]) for b in range(blocks)],
            "late_snr_recent": [mean([r.adam_snr(b, "recent") for r in late]) for b in range(blocks)]}
    for name, row in rows.items():
        print(f"{name}: recent scale / v at steps {row['steps']}")
        for b, ratios in enumerate(row["ratio"]):
            print(f"  block {b}: " + " ".join(f"{x:5.2f}" for x in ratios)
                  + f"   second-half snr: against v {row['late_snr_v'][b]:+.4f}, recent {row['late_snr_recent'][b]:+.4f}")
    return rows


def progress_table(tasks: list[str]) -> dict[str, Any]:
    """The ``progress`` command (module doc): what a rule on update progress would see at the resume
    points, and what freezing there cost."""
    rows: dict[str, Any] = {}
    for task, seed, run, records in _watch_runs(tasks):
        if records[-1].progress is None:
            continue
        total, blocks = run["train_steps"], run["num_blocks"]
        # Per block, then the parameters outside the blocks: update i + 1's progress at index i.
        series = [[v for r in records for v in r.progress[b]] for b in range(blocks)]
        series.append([v for r in records for v in r.progress_rest])
        whole = sum(map(sum, series))
        grid = resume_grid(task, seed)
        points = []
        for fraction in FRACTIONS:
            step = round(fraction * total)
            window = [sum(s[max(0, step - round(0.1 * total)):step]) for s in series]
            ahead = [sum(s[step:]) for s in series]
            points.append({
                "fraction": fraction, "step": step,
                "recent": [round(100 * sum(window[:k]) / sum(window), 1) for k in range(1, blocks + 1)],
                "ahead": [round(100 * sum(ahead[:k]) / whole, 1) for k in range(1, blocks + 1)],
                "cost": {k: round(c, 2) for (k, f), c in grid.items() if abs(f - fraction) < 0.02}})
        rows[f"{task}/{seed}"] = {"updates": len(series[0]), "progress": round(whole, 4), "points": points}
    for name, row in rows.items():
        print(f"{name}: first-order loss decrease over {row['updates']} updates {row['progress']}; "
              "per fraction, the first k = 1.. blocks' share (%) of the last tenth's decrease | of the run's still ahead")
        for point in row["points"]:
            cost = ", ".join(f"{k} blocks cost {c:+.2f} pt" for k, c in sorted(point["cost"].items()))
            print(f"  {point['fraction']:.0%} (step {point['step']}): " + " ".join(f"{x:5.1f}" for x in point["recent"])
                  + " | " + " ".join(f"{x:5.1f}" for x in point["ahead"]) + (f"   [{cost}]" if cost else ""))
    return rows


def _label(config: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in config.items() if k != "min_trainable") + f" min={config['min_trainable']}"


def replay_all(tasks: list[str]) -> dict[str, Any]:
    """Every GRID setting on every watch run: freeze events, estimated speedup and cost."""
    rows: dict[str, Any] = {}
    for config in GRID:
        label = _label(config)
        rows[label] = {"config": config, "runs": {}}
        for task in tasks:
            for seed in SEEDS:
                path = os.path.join(OUT, f"{task}-seed{seed}-watch.json")
                if not os.path.isfile(path):
                    continue
                with open(path) as f:
                    watch_run = json.load(f)
                total = watch_run["train_steps"]
                warmup = round(0.06 * total)  # the bench configs' warmup_num_steps
                events = replay(watch_run["decisions"], total, warmup, config, num_blocks(task))
                epoch = total // TASKS[task]["sizes"][2]
                speedup = estimated_speedup(events, total, epoch, num_blocks=num_blocks(task))
                rows[label]["runs"][f"{task}/{seed}"] = {
                    "events": events, "speedup": round(speedup, 3),
                    "cost": estimated_cost(events, total, resume_grid(task, seed))}
    return rows


def print_replay(rows: dict[str, Any]) -> None:
    runs = sorted({r for row in rows.values() for r in row["runs"]})
    print("| setting | " + " | ".join(runs) + " |")
    print("|---|" + "---|" * len(runs))
    for label, row in rows.items():
        cells = []
        for r in runs:
            cell = row["runs"].get(r)
            if cell is None:
                cells.append("")
                continue
            events = ", ".join(f"{k}@{s}" for s, k in cell["events"]) or "none"
            cost = "" if cell["cost"] is None else f", costs ~{cell['cost']:.1f} pt"
            cells.append(f"{events} ({cell['speedup']:.2f}x{cost})")
        print(f"| {label} | " + " | ".join(cells) + " |")


def main() -> None:
    global OUT, RESUME_DIR
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("watch", "resume"):
        s = sub.add_parser(name)
        s.add_argument("--tasks", nargs="+", default=DEFAULT_TASKS, choices=list(TASKS))
        s.add_argument("--seeds", nargs="+", type=int, default=SEEDS)
        if name == "resume":
            s.add_argument("--fractions", nargs="+", type=float, default=FRACTIONS)
            s.add_argument("--blocks", nargs="+", type=int, default=RESUME_BLOCKS)
    s = sub.add_parser("confirm")
    s.add_argument("--tasks", nargs="+", default=DEFAULT_TASKS, choices=list(TASKS))
    s.add_argument("--seeds", nargs="+", type=int, default=SEEDS)
    s.add_argument("--name", required=True, help="names the runs and confirm-NAME.json")
    s.add_argument("--decider", type=json.loads, default=None,
                   help="the decider section as JSON (default: the one in configs/autofreeze_cache.json)")
    s.add_argument("--section", type=json.loads, default=None,
                   help='other keys of the "autofreeze" section as JSON, e.g. \'{"rescale_clipping": false}\'')
    s.add_argument("--reference", default=None,
                   help="compare with confirm-NAME.json's runs where it has the seed (else the watch run), e.g. "
                        "--decider '{\"name\": \"static\", \"num_frozen_blocks\": 0}' runs named full")
    for name in ("replay", "scale", "progress"):
        s = sub.add_parser(name)
        s.add_argument("--tasks", nargs="+", default=DEFAULT_TASKS, choices=list(TASKS))
        if name == "replay":
            s.add_argument("--resume_dir", default=None,
                           help="the resume runs that score the replays (default: --out), e.g. watch runs made "
                                "again into another --out, scored by the first study's resumes")
    p.add_argument("--out", default=OUT, help="where runs and summaries go (default: bench/results/decider_study)")
    args = p.parse_args()
    OUT = os.path.abspath(args.out)
    RESUME_DIR = os.path.abspath(getattr(args, "resume_dir", None) or OUT)
    os.makedirs(OUT, exist_ok=True)
    if args.command == "watch":
        watch(args.tasks, args.seeds)
    elif args.command == "resume":
        resume(args.tasks, args.seeds, args.fractions, args.blocks)
    elif args.command == "confirm":
        confirm(args.tasks, args.seeds, args.name, args.decider or base_config()["autofreeze"]["decider"],
                args.section, args.reference)
    elif args.command == "replay":
        rows = replay_all(args.tasks)
        print_replay(rows)
        # The default tasks' replay is replay.json; another set of tasks gets its own file.
        name = "replay" if args.tasks == DEFAULT_TASKS else "-".join(["replay", *args.tasks])
        with open(os.path.join(OUT, f"{name}.json"), "w") as f:
            json.dump(rows, f, indent=1)
    elif args.command in ("scale", "progress"):
        table = scale_table if args.command == "scale" else progress_table
        with open(os.path.join(OUT, f"{args.command}.json"), "w") as f:
            json.dump(table(args.tasks), f, indent=1)


if __name__ == "__main__":
    main()
