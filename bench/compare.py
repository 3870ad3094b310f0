"""Full fine-tuning vs static freezing vs AutoFreeze (with and without the activation cache).

    python bench/compare.py                     # the README's setting: MiniLM-L6, IMDb 4,000 / 5,000, 3 epochs
    python bench/compare.py --max_train_samples 640 --max_eval_samples 500 --num_train_epochs 1   # a quick look

Each run is ``launch/finetune.py`` with one config from configs/, run one after another (never
concurrently: on 2 cores a parallel run would distort both timings). Speedup = full's
train_runtime / the run's train_runtime (training steps only; evaluation and checkpoints are
excluded from both and reported separately). Prints a markdown table; writes results.json and
timeline.png under --out.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = {"full": "configs/full.json", "static": "configs/static.json", "autofreeze": "configs/autofreeze.json",
        "autofreeze+cache": "configs/autofreeze_cache.json", "static+cache": "configs/static_cache.json"}
DEFAULT_RUNS = ["full", "static", "autofreeze", "autofreeze+cache"]


def load_config(path: str) -> dict:
    """A DeepSpeed JSON config; ``path`` relative to the repository or absolute."""
    with open(os.path.join(ROOT, path)) as f:
        return json.load(f)


def with_learning_rate(config: dict, lr: Optional[float]) -> dict:
    """``config`` with ``lr`` as its peak learning rate (None: as it is): the optimizer's and the warmup's
    peak alike, or the warmup would climb to the config's own."""
    if lr is not None:
        config["optimizer"]["params"]["lr"] = config["scheduler"]["params"]["warmup_max_lr"] = lr
    return config


def write_config(config: dict, directory: str, name: str) -> str:
    """``config`` written as ``directory``/``name``.json, for a run's --deepspeed_config; the path."""
    path = os.path.join(directory, f"{name}.json")
    with open(path, "w") as f:
        json.dump(config, f, indent=1)
    return path


def run_command(name: str, cmd: list[str], out_dir: str, reuse: bool = False, env: Optional[dict] = None) -> dict:
    """Runs a launch script that writes ``out_dir``/all_results.json (its output in ``out_dir``/log.txt);
    those results plus the wall time. A finished run records its command and results in
    ``out_dir``/run.json; with ``reuse``, one that finished with the same command is read back instead
    of run again, so a long bench stopped midway goes on where it stopped (only ratios of runs made
    side by side in one session compare their times)."""
    record = os.path.join(out_dir, "run.json")
    identity = run_identity(cmd)
    if reuse and os.path.exists(record):
        with open(record) as f:
            done = json.load(f)
        if done["identity"] == identity if "identity" in done else done["command"] == cmd:
            print(f"[{name}] reused the finished run in {out_dir}", flush=True)
            return done["result"]
    os.makedirs(out_dir, exist_ok=True)
    log_path = os.path.join(out_dir, "log.txt")
    print(f"[{name}] {' '.join(cmd)}  (log: {log_path})", flush=True)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    if proc.returncode != 0:
        with open(log_path) as f:
            tail = f.read()[-3000:]
        raise SystemExit(f"[{name}] failed with exit code {proc.returncode}:\n{tail}")
    with open(os.path.join(out_dir, "all_results.json")) as f:
        result = json.load(f)
    result["wall_seconds"] = round(time.perf_counter() - start, 1)
    with open(record, "w") as f:
        json.dump({"command": cmd, "identity": identity, "result": result}, f, indent=1)
    return result


def run_identity(cmd: Sequence[str]) -> list:
    """What makes two runs the same: the command with its --deepspeed_config path replaced by the
    file's content. Benches write their configs to temporary directories, so the path alone never
    matches a finished run (--reuse then ran everything again)."""
    identity: list = list(cmd)
    if "--deepspeed_config" in identity:
        i = identity.index("--deepspeed_config") + 1
        identity[i] = load_config(identity[i])  # relative to the repository, as the run (cwd=ROOT) reads it
    return identity


def run_one(name: str, config: str, args: argparse.Namespace, launcher: Sequence[str] = (),
            extra: Sequence[str] = ()) -> dict:
    """One launch/finetune.py run (under ``launcher``, e.g. ``deepspeed --num_gpus 2``; default:
    this Python) with the bench's data settings and ``extra`` arguments (a task, its data files);
    its all_results.json plus wall time."""
    out_dir = os.path.join(args.out, name)
    cmd = [*(launcher or [sys.executable]), os.path.join(ROOT, "launch", "finetune.py"), "--deepspeed_config",
           os.path.join(ROOT, config), "--output_dir", out_dir, "--max_train_samples", str(args.max_train_samples),
           "--max_eval_samples", str(args.max_eval_samples), "--max_seq_length", str(args.max_seq_length),
           "--num_train_epochs", str(args.num_train_epochs), "--seed", str(args.seed), "--no_progress", *extra]
    result = run_command(name, cmd, out_dir, args.reuse)
    scores = ", ".join(f"{k[5:]} {v:.4f}" for k, v in result.items() if k.startswith("eval_") and v is not None)
    print(f"[{name}] {scores}, train {result['train_runtime']:.1f}s, "
          f"frozen {result['final_frozen_blocks']}", flush=True)
    return result


def table(results: dict[str, dict]) -> str:
    base = results.get("full")
    rows = ["| run | eval accuracy | Δ vs full (pt) | train time (s) | speedup vs full | frozen blocks over time |",
            "|---|---|---|---|---|---|"]
    rows += [f"| {name} | {cells(r, base)} |" for name, r in results.items()]
    return "\n".join(rows)


def cells(r: dict, base: Optional[dict], metrics: Sequence[str] = ("accuracy",)) -> str:
    """A run's table cells against the full run ``base``: scores, Δ of the first (pt), train time,
    speedup, freezes."""
    score = ", ".join((f"{m} " if len(metrics) > 1 else "") + f"{r['eval_' + m]:.4f}" for m in metrics)
    main = "eval_" + metrics[0]
    delta = f"{100 * (r[main] - base[main]):+.2f}" if base else "n/a"
    speedup = f"{base['train_runtime'] / r['train_runtime']:.2f}x" if base else "n/a"
    events = ", ".join(f"{e['frozen_blocks']}@{e['step']}" for e in r["freeze_events"]) or "none"
    return f"{score} | {delta} | {r['train_runtime']:.1f} | {speedup} | {events} (of {r['num_blocks']}; k@step)"


def plot(results: dict[str, dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_frozen, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in results.items():
        end = r["train_runtime"]
        times, blocks = [0.0], [0]
        for e in r["freeze_events"]:
            times += [e["train_time"], e["train_time"]]
            blocks += [blocks[-1], e["frozen_blocks"]]
        times.append(end)
        blocks.append(blocks[-1])
        ax_frozen.plot(times, blocks, label=name)
        ax_acc.plot([h["train_time"] for h in r["epochs"]], [h["eval_accuracy"] for h in r["epochs"]], "o-",
                    label=name)
    ax_frozen.set(xlabel="training time (s)", ylabel="frozen blocks", title="frozen prefix over time")
    ax_acc.set(xlabel="training time (s)", ylabel="held-out accuracy", title="accuracy after each epoch")
    for ax in (ax_frozen, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_results(args: argparse.Namespace, results: dict, md: str) -> None:
    """Print the table; write it with the runs' results and the settings to <out>/results.json."""
    print("\n" + md)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "results.json")
    with open(path, "w") as f:
        json.dump({"command": " ".join(sys.argv), "settings": vars(args), "results": results, "table": md}, f,
                  indent=1)
    print(f"\nwrote {path}")


def bench_parser(doc: str, out: str) -> argparse.ArgumentParser:
    """The README's setting (MiniLM-L6, IMDb 4,000 / 5,000, 3 epochs), shared by the end-to-end benches."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--max_train_samples", type=int, default=4000)
    p.add_argument("--max_eval_samples", type=int, default=5000)
    p.add_argument("--max_seq_length", type=int, default=128)
    p.add_argument("--num_train_epochs", type=int, default=3)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--reuse", action="store_true",
                   help="read back runs that already finished with the same command (their run.json) instead of "
                        "running them again")
    # Absolute: the runs write there from the repository root, whatever the caller's directory.
    p.add_argument("--out", type=os.path.abspath, default=os.path.join(ROOT, "bench", "results", out))
    return p


def main() -> None:
    p = bench_parser(__doc__, "compare")
    p.add_argument("--runs", nargs="+", default=DEFAULT_RUNS, choices=list(RUNS))
    args = p.parse_args()

    results = {name: run_one(name, RUNS[name], args) for name in args.runs}
    write_results(args, results, table(results))
    plot(results, os.path.join(args.out, "timeline.png"))
    print(f"wrote {os.path.join(args.out, 'timeline.png')}")


if __name__ == "__main__":
    main()
