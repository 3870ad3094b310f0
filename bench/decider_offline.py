"""Offline looks, from the watch runs' checkpoints, for a statistic that tells QA's early blocks (whose
freezing costs about one F1 point at 55-70% of training) from IMDb's and multiple choice's (whose
freezing costs nothing measurable): docs/deciders.md, "Other statistics, checked offline".

    python bench/decider_offline.py moments             # per block, from the optimizer state at each checkpoint
    python bench/decider_offline.py rollback --probe 128 # held-out loss with the first blocks' last window undone

- moments: Adam's ratio sum(m^2) / sum(v) per block (what the shipped rule reads), its largest value over
  the block's tensors (a small tensor with steady signal drowns in a block sum), and the persistence of
  the block's update: the cosine between its weight change over one checkpoint window and over the next
  (0 for a random walk, towards 1 for steady drift; with K steps per window the per-step
  signal-to-noise ratio is about cos / ((1 - cos) K)).
- rollback: the loss on ``--probe`` held-out examples (eval mode) with the weights of a checkpoint,
  and with blocks [0, k) set back to the previous checkpoint's: what the last window's update of the
  first k blocks did for held-out loss, against what the whole model's did.

Reads bench/results/decider_study/runs/<task>/seed<N>/watch/checkpoints (bench/decider_study.py watch
writes them, every tenth of a run; not committed); prints a table per run and writes
bench/results/decider_study/offline-<command>.json.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
sys.path.insert(0, os.path.join(ROOT, "launch"))

import decider_study as study  # noqa: E402
from finetune import WEIGHT_DECAY_OFF  # noqa: E402

FRONT = 2  # the blocks the shipped rule freezes on MiniLM-L6 (min_trainable 4 of 6)


def checkpoints(task: str, seed: int) -> list[str]:
    found = glob.glob(os.path.join(study.run_dir(task, seed), "watch", "checkpoints", "step*"))
    return sorted(found, key=lambda d: int(os.path.basename(d)[4:]))


def block_of(name: str) -> int | None:
    m = re.search(r"\.layer\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def read(directory: str) -> dict:
    """A one-rank ZeRO-0 checkpoint's model states (weights, optimizer state, global_steps)."""
    return torch.load(os.path.join(directory, "mp_rank_00_model_states.pt"), map_location="cpu", weights_only=False)


def load(directory: str) -> tuple[int, dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """(step, name -> (weight, bias-corrected m, bias-corrected v)) of a one-rank ZeRO-0 checkpoint."""
    sd = read(directory)
    names = list(sd["module"])
    # The optimizer's parameter order: the weight-decay group, then the rest (launch/finetune.py).
    order = [n for n in names if not n.endswith(WEIGHT_DECAY_OFF)] + [n for n in names if n.endswith(WEIGHT_DECAY_OFF)]
    state = sd["optimizer"]["state"]
    beta1, beta2 = sd["optimizer"]["param_groups"][0]["betas"]
    out = {}
    for i, name in enumerate(order):
        t = float(state[i]["step"])
        out[name] = (sd["module"][name].float(), state[i]["exp_avg"] / (1 - beta1 ** t),
                     state[i]["exp_avg_sq"] / (1 - beta2 ** t))
    return sd["global_steps"], out


def moments(task: str, seed: int) -> list[dict]:
    rows, prev_weights, prev_delta = [], None, None
    for directory in checkpoints(task, seed):
        step, params = load(directory)
        blocks = sorted({b for b in map(block_of, params) if b is not None})
        weights = [torch.cat([w.flatten() for n, (w, _, _) in params.items() if block_of(n) == b]) for b in blocks]
        delta = None if prev_weights is None else [w - p for w, p in zip(weights, prev_weights)]
        row = {"step": step, "ratio": [], "max_tensor_ratio": [],
               "persistence": [None] * len(blocks) if delta is None or prev_delta is None else
               [float(torch.dot(d, p) / (d.norm() * p.norm())) for d, p in zip(delta, prev_delta)]}
        for b in blocks:
            tensors = [(m, v) for n, (_, m, v) in params.items() if block_of(n) == b]
            row["ratio"].append(sum(float((m ** 2).sum()) for m, _ in tensors) / sum(float(v.sum()) for _, v in tensors))
            row["max_tensor_ratio"].append(max(float((m ** 2).sum() / v.sum()) for m, v in tensors))
        rows.append(row)
        prev_weights, prev_delta = weights, delta
    return rows


def rollback(task: str, seed: int, probe: int) -> list[dict]:
    from finetune import parse_args, resolve_model_path
    from transformers import AutoTokenizer
    from ds_autofreeze.tasks import build_task
    spec, extra = study.task_args(task, seed, "unused")
    argv = ["--deepspeed_config", "unused", "--max_train_samples", str(spec.max_train_samples), "--max_eval_samples",
            str(spec.max_eval_samples), "--max_seq_length", str(spec.max_seq_length), "--seed", str(seed), *extra]
    held_out_as_train = "--validation_file" in argv  # held-out rows with labels: read as training data
    if held_out_as_train:
        argv[argv.index("--train_file") + 1] = argv[argv.index("--validation_file") + 1]
    args = parse_args(argv)
    path = resolve_model_path(args)
    t = build_task(args)
    train, evaluation = t.load(AutoTokenizer.from_pretrained(path))
    data = train if held_out_as_train else evaluation.features  # the packaged IMDb split: its held-out part
    model = t.model_class().from_pretrained(path, **t.model_kwargs()).eval()
    rows_of_probe = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:probe].tolist()

    @torch.no_grad()
    def loss(weights: dict[str, torch.Tensor]) -> float:
        model.load_state_dict(weights)
        total = 0.0
        for j in range(0, len(rows_of_probe), 32):
            ids = rows_of_probe[j:j + 32]
            total += float(model(**data.batch(ids)).loss) * len(ids)
        return total / len(rows_of_probe)

    rows, prev = [], None
    for directory in checkpoints(task, seed):
        sd = read(directory)
        cur = sd["module"]
        if prev is not None:
            base = loss(cur)
            undone = {}
            for k in (1, FRONT, None):  # None: the whole model set back
                mixed = {n: prev[n] if k is None or (block_of(n) is not None and block_of(n) < k) else w
                         for n, w in cur.items()}
                undone["all" if k is None else f"blocks<{k}"] = loss(mixed) - base
            rows.append({"step": sd["global_steps"], "loss": base, "undone": undone})
        prev = cur
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("command", choices=("moments", "rollback"))
    p.add_argument("--tasks", nargs="+", default=list(study.TASKS), choices=list(study.TASKS))
    p.add_argument("--seeds", nargs="+", type=int, default=study.SEEDS)
    p.add_argument("--probe", type=int, default=128, help="held-out examples (rollback)")
    args = p.parse_args()
    results: dict[str, list[dict]] = {}
    for task in args.tasks:
        for seed in args.seeds:
            if not checkpoints(task, seed):
                print(f"[{task} seed {seed}] no watch checkpoints under {study.run_dir(task, seed)}: skipped")
                continue
            total = json.load(open(os.path.join(study.OUT, f"{task}-seed{seed}-watch.json")))["train_steps"]
            rows = moments(task, seed) if args.command == "moments" else rollback(task, seed, args.probe)
            results[f"{task}/{seed}"] = rows
            print(f"\n{task} seed {seed} ({total} steps)")
            for r in rows:
                if args.command == "moments":
                    cells = [f"{a:.3f}/{b:.3f}/" + ("-" if c is None else f"{c:.2f}")
                             for a, b, c in zip(r["ratio"], r["max_tensor_ratio"], r["persistence"])]
                    print(f"  {r['step'] / total:.2f}  ratio/max tensor/persistence per block: " + "  ".join(cells))
                else:
                    print(f"  {r['step'] / total:.2f}  held-out loss {r['loss']:.4f}, undoing the last window: "
                          + ", ".join(f"{k} {v:+.4f}" for k, v in r["undone"].items()))
            sys.stdout.flush()
    with open(os.path.join(study.OUT, f"offline-{args.command}.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
