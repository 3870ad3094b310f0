"""The speed/accuracy frontier of freezing in the compare setting: fixed freeze schedules (+ cache).

    python bench/frontier.py --schedules 4@0.1,5@0.3 3@0.1,4@0.2,5@0.4    # runs full first, then each schedule
    python bench/frontier.py --full_from bench/results/compare/results.json --schedules 4@0.05

A schedule ``k@f,...`` freezes the first k blocks at fraction f of training (the ``schedule`` decider,
with the activation cache on). No online rule can beat the best fixed schedule it could have chosen,
so this bounds what any decider reaches here: whether a point such as "2.5x faster, accuracy within
1 pt" exists at all in this setting, and which freeze steps it needs. Prints a markdown table; writes
results.json under --out.
"""
from __future__ import annotations

import json
import tempfile

from compare import RUNS, bench_parser, load_config, run_one, table, write_config, write_results


def parse_schedule(text: str) -> list[dict]:
    """``"4@0.1,5@0.3"`` -> the schedule decider's entries."""
    entries = []
    for part in text.split(","):
        blocks, _, fraction = part.partition("@")
        entries.append({"fraction": float(fraction), "num_frozen_blocks": int(blocks)})
    return entries


def schedule_config(entries: list[dict], directory: str, name: str) -> str:
    """configs/autofreeze_cache.json with its decider replaced by the schedule; the path written."""
    config = load_config(RUNS["autofreeze+cache"])
    config["autofreeze"]["decider"] = {"name": "schedule", "schedule": entries}
    return write_config(config, directory, name)


def main() -> None:
    p = bench_parser(__doc__, "frontier")
    p.add_argument("--schedules", nargs="+", required=True, help="k@fraction,... per run")
    p.add_argument("--full_from", default=None,
                   help="a compare/frontier results.json whose full run (same settings) is the reference; "
                        "default: run full here first")
    args = p.parse_args()

    if args.full_from:
        with open(args.full_from) as f:
            previous = json.load(f)
        for key in ("max_train_samples", "max_eval_samples", "max_seq_length", "num_train_epochs", "seed"):
            if previous["settings"][key] != getattr(args, key):
                raise SystemExit(f"--full_from: its {key} is {previous['settings'][key]}, this run's is "
                                 f"{getattr(args, key)}")
        results = {"full": previous["results"]["full"]}
    else:
        results = {"full": run_one("full", RUNS["full"], args)}
    with tempfile.TemporaryDirectory() as configs:
        for text in args.schedules:
            slug = "schedule_" + text.replace("@", "at").replace(",", "_")
            results[f"schedule {text}"] = run_one(slug, schedule_config(parse_schedule(text), configs, slug), args)

    write_results(args, results, table(results))


if __name__ == "__main__":
    main()
