"""Replay logged gradnorm decisions under other settings: when would each rule have frozen?

    python bench/decider_replay.py RUN/all_results.json [RUN2/all_results.json ...]

A run's ``all_results.json`` holds every decision's all-reduced block norms (``decisions``). Log
a run that never freezes — the gradnorm decider with ``min_trainable`` equal to the number of
blocks watches without acting, so the run is full fine-tuning — and this replays those norms
through the decider with each setting below. The replay is exact up to the first freeze it
reports; after it, a real run's norms would differ (the frozen blocks stop feeding the
trainable ones different inputs), so later events are indicative. Prints a table; writes JSON
next to the first input (or to --out).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ds_autofreeze.config import GradNormConfig  # noqa: E402
from ds_autofreeze.deciders import build_decider  # noqa: E402

SETTINGS = [{}, {"patience": 2}, {"max_ratio": 0.1}, {"max_ratio": 0.2}, {"max_ratio": 0.2, "patience": 2},
            {"max_ratio": 0.1, "patience": 2}]


def replay(decisions: list[dict], num_blocks: int, interval: int, min_trainable: int, **guards) -> list[str]:
    """``k@step`` for every boundary move the setting would have made on these norms."""
    decider = build_decider(GradNormConfig(interval_steps=interval, min_trainable=min_trainable, **guards),
                            num_blocks, None)
    boundary, events = 0, []
    for record in decisions:
        new = decider.decide(record["step"], boundary, record["block_norms"])
        if new > boundary:
            events.append(f"{new}@{record['step']}")
            boundary = new
    return events


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("results", nargs="+", help="all_results.json of runs that logged decisions")
    p.add_argument("--min_trainable", type=int, default=2, help="as the shipped configs")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    rows = ["| run | steps | interval | setting | freezes (k@step) |", "|---|---|---|---|---|"]
    out = []
    for path in args.results:
        with open(path) as f:
            run = json.load(f)
        decisions = run.get("decisions") or []
        if len(decisions) < 2:
            raise SystemExit(f"{path}: no gradnorm decisions logged")
        interval = decisions[0]["step"]
        for guards in SETTINGS:
            events = replay(decisions, run["num_blocks"], interval, args.min_trainable, **guards)
            setting = ", ".join(f"{k} {v}" for k, v in guards.items()) or "paper (percentile only)"
            name = f"{run.get('task', 'classification')} ({os.path.basename(path)})"
            rows.append(f"| {name} | {run['train_steps']} | {interval} | {setting} | {', '.join(events) or 'none'} |")
            out.append({"run": path, "setting": guards, "events": events})
    table = "\n".join(rows)
    print(table)
    target = args.out or os.path.join(os.path.dirname(os.path.abspath(args.results[0])), "replay.json")
    with open(target, "w") as f:
        json.dump({"command": " ".join(sys.argv), "replays": out, "table": table}, f, indent=1)
    print(f"\nwrote {target}")


if __name__ == "__main__":
    main()
