"""What AutoFreeze adds to every training step while it has frozen nothing: its statistics' tensor
ops and their CPU time, per decider, against the engine's own step.

    python bench/overhead.py                       # MPNet-shaped (12 blocks), ZeRO 0, 120 steps
    python bench/overhead.py --stage 2 --steps 60  # ZeRO-2's flat partitions
    python bench/overhead.py --hidden 768          # all-mpnet-base-v2's size (random weights); on a GPU machine
                                                   # (DS_ACCELERATOR=cuda) the step times are the GPU's

On a GPU every tensor op AutoFreeze issues is a kernel launch (several microseconds of host time,
whatever its size): on the H200 (bench/mpnet.py --gpu) the noise-aware deciders ran 7-12% slower
than full fine-tuning with nothing frozen. This CPU cannot time a GPU, but it can count. The model
is all-mpnet-base-v2's structure (the same parameter tensors per block) at a tiny width, so the
counts are the real model's (``--hidden 768``: its size too), and no decision ever freezes
(``min_trainable`` = all blocks), so every step is one a run pays before its first freeze.
Counted with a TorchDispatchMode: ops that compute (views are not counted; each of the rest is at
least one kernel on a GPU) in the inner optimizer's step pre-hook (the gradient moments) and in
``after_step`` (the decider's reads; for ``drift``, the probe set's forward pass at each decision),
per optimizer step, averaged over the run (the warmup's Adam reads and each decision included);
the engine's own forward, backward and step for scale. Times come from a second pass without the
counter, from step 6 on: AutoFreeze's host time, and the whole step's wall time (which, as in
launch/finetune.py, reads the loss each step); on this noisy CPU the step times of separate runs
are not comparable within a few tens of percent, the counts are exact.
Prints a markdown table; writes bench/results/overhead.json.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from typing import Any, Callable

from torch.utils._python_dispatch import TorchDispatchMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

class OpCounter(TorchDispatchMode):
    """Counts the tensor ops dispatched within it that compute (views are not counted)."""

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += not func.is_view
        return func(*args, **(kwargs or {}))


UNTIMED = 5  # steps before the timing starts (the counts cover every step)
# Never-firing settings of each decider: the reads and hooks run as in a real run, nothing freezes.
DECIDERS: dict[str, dict[str, Any] | None] = {
    "full (autofreeze off)": None,
    "snr, adam (shipped)": {"name": "snr", "estimator": "adam", "min_trainable": 12},
    "snr, adam, recent reference": {"name": "snr", "estimator": "adam", "adam_reference": "recent",
                                    "min_trainable": 12},
    "snr, moments": {"name": "snr", "estimator": "moments", "min_trainable": 12},
    "gradnorm": {"name": "gradnorm", "num_intervals": 10, "min_trainable": 12},
    "drift (64 probe examples)": {"name": "drift", "min_trainable": 12},
}


def mpnet_shaped(layers: int, hidden: int):
    import torch
    from transformers import MPNetConfig, MPNetForSequenceClassification
    torch.manual_seed(0)
    return MPNetForSequenceClassification(MPNetConfig(vocab_size=512, num_hidden_layers=layers, hidden_size=hidden,
                                                      num_attention_heads=max(2, hidden // 64),
                                                      intermediate_size=4 * hidden, max_position_embeddings=80,
                                                      num_labels=2))


def run(decider: dict[str, Any] | None, layers: int, hidden: int, stage: int, steps: int, count: bool
        ) -> dict[str, Any]:
    import torch

    import ds_autofreeze
    from ds_autofreeze.statistics import GradientMoments

    totals = {"hook": [0, 0.0], "after_step": [0, 0.0], "engine": [0, 0.0], "step": [0, 0.0]}
    timing = [False]  # the first steps pay one-time costs (lazy initialization, the allocator): not timed

    def measured(part: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            if count:
                with OpCounter() as counter:
                    out = fn(*args, **kwargs)
                totals[part][0] += counter.ops
            else:
                out = fn(*args, **kwargs)
            if timing[0]:
                totals[part][1] += time.perf_counter() - start
            return out
        return call

    hook = GradientMoments._on_step
    GradientMoments._on_step = measured("hook", hook)  # before initialize: the hook is bound there
    try:
        model = mpnet_shaped(layers, hidden)
        config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
                  "steps_per_print": 10 ** 9, "zero_optimization": {"stage": stage},
                  "optimizer": {"type": "AdamW", "params": {"lr": 2e-4, "weight_decay": 0.01, "torch_adam": True}},
                  "scheduler": {"type": "WarmupDecayLR", "params": {
                      "warmup_min_lr": 0, "warmup_max_lr": 2e-4, "warmup_num_steps": max(1, round(0.06 * steps)),
                      "total_num_steps": steps}},
                  "autofreeze": ({"enabled": False} if decider is None else
                                 {"total_steps": steps, "log_freezes": False, "decider": decider})}
        engine, _, _, _, af = ds_autofreeze.initialize(model=model, model_parameters=model.parameters(), config=config)
        g = torch.Generator().manual_seed(1)
        batch = {"input_ids": torch.randint(1, 512, (4, 16), generator=g),
                 "attention_mask": torch.ones(4, 16, dtype=torch.long), "labels": torch.tensor([0, 1, 0, 1])}
        batch = {k: v.to(engine.device) for k, v in batch.items()}
        if decider is not None and decider["name"] == "drift":  # launch/finetune.py's default probe size
            af.set_probe({"input_ids": torch.randint(1, 512, (64, 16), generator=g).to(engine.device),
                          "attention_mask": torch.ones(64, 16, dtype=torch.long, device=engine.device)})

        def train_step() -> None:
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
            loss.item()

        engine_step, after_step = measured("engine", train_step), measured("after_step", af.after_step)

        def whole_step() -> None:
            engine_step()
            after_step()

        step = measured("step", whole_step) if not count else whole_step
        for t in range(steps):
            timing[0] = t >= UNTIMED
            step()
        assert af.num_frozen_blocks == 0, "the bench's deciders must never freeze"
        af.close()
    finally:
        GradientMoments._on_step = hook
    # The hook runs inside the engine's step: the engine's own share is what is left.
    totals["engine"][0] -= totals["hook"][0]
    totals["engine"][1] -= totals["hook"][1]
    return {part: {"ops" if count else "ms": (ops / steps if count else 1000 * seconds / (steps - UNTIMED))}
            for part, (ops, seconds) in totals.items() if not (count and part == "step")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=32, help="768: all-mpnet-base-v2's width")
    p.add_argument("--stage", type=int, default=0, choices=[0, 1, 2])
    p.add_argument("--steps", type=int, default=120, help=f"more than {UNTIMED}")
    p.add_argument("--deciders", nargs="+", default=list(DECIDERS), choices=list(DECIDERS))
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "overhead.json"))
    args = p.parse_args()
    import torch
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=os.environ.get("MASTER_PORT", str(random.randint(20000, 40000))))
    if args.hidden <= 64:
        torch.set_num_threads(1)  # a tiny model: threads add only noise to the times
    rows = []
    for name in args.deciders:
        decider = DECIDERS[name]
        if decider is not None:
            decider = {**decider, "min_trainable": args.layers}
        counted = run(decider, args.layers, args.hidden, args.stage, args.steps, count=True)
        timed = run(decider, args.layers, args.hidden, args.stage, args.steps, count=False)
        rows.append({"run": name, "decider": decider,
                     **{part: {**counted.get(part, {}), **timed[part]} for part in timed}})
        print(f"{name}: done", file=sys.stderr, flush=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"\nper optimizer step, MPNet-shaped ({args.layers} blocks, hidden {args.hidden}), ZeRO-{args.stage}, "
          f"{args.steps} steps, nothing frozen, {device}\n")
    print("| run | AutoFreeze ops: step hook | AutoFreeze ops: after_step | engine ops | AutoFreeze ops / engine ops | "
          "AutoFreeze host ms | step ms | step time vs full |")
    print("|---|---|---|---|---|---|---|---|")
    full = next((r["step"]["ms"] for r in rows if r["decider"] is None), None)
    for r in rows:
        ours = r["hook"]["ops"] + r["after_step"]["ops"]
        print(f"| {r['run']} | {r['hook']['ops']:.1f} | {r['after_step']['ops']:.1f} | {r['engine']['ops']:.0f} | "
              f"{ours / r['engine']['ops']:.1%} | {r['hook']['ms'] + r['after_step']['ms']:.2f} | "
              f"{r['step']['ms']:.1f} | {r['step']['ms'] / full if full else float('nan'):.3f} |")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"source": "python " + " ".join(sys.argv), "device": device, "layers": args.layers,
                   "hidden": args.hidden, "stage": args.stage,
                   "steps": args.steps, "rows": rows}, f, indent=1)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
