"""Checks that need a GPU (fp16 and bf16 engines, CUDA tensors): run on a lent GPU machine.

    python bench/gpu_checks.py                  # prints a table; writes $OUT/gpu_checks.json (or --out)

On the CPU, DeepSpeed has no fp16, so these run where one is lent (the tests cover the rest on the
CPU). One process, a tiny random BERT (4 blocks), DeepSpeed's torch AdamW (no JIT-built op):
- every ZeRO stage with fp16 (dynamic loss scaling) and bf16, ZeRO-0 fp16 through DeepSpeed's unfused
  wrapper: AutoFreeze attaches, freezes 2 blocks at step 4, the frozen weights never move after it,
  the optimizer's fp32 masters and Adam moments of a staying parameter survive the rebuild bit for bit;
- the statistics read unscaled gradients: two fp16 runs whose static loss scales differ 256x log the
  same gradient moments (up to fp16 rounding);
- the activation cache is exact on CUDA: cached and uncached bf16 runs give the same losses;
- the statistics' per-chunk sums (``statistics._chunk_sums``: one fused ``_foreach_norm`` on CUDA, a
  dot or a sum per chunk on CPU) agree between the two within 1e-5.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def tiny_bert(seed: int = 0):
    import torch
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(vocab_size=120, hidden_size=64, num_hidden_layers=4,
                                                    num_attention_heads=2, intermediate_size=128,
                                                    max_position_embeddings=64))


def batches(n: int, device, micro: int = 8, seq: int = 16):
    import torch
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(1, 120, (micro, seq), generator=g).to(device),
             "attention_mask": torch.ones(micro, seq, dtype=torch.long, device=device),
             "labels": torch.randint(0, 2, (micro,), generator=g).to(device)} for _ in range(n)]


def config(stage: int, precision: str, autofreeze: dict, loss_scale: float = 0) -> dict:
    cfg = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
           "steps_per_print": 10 ** 9, "zero_optimization": {"stage": stage},
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01, "torch_adam": True}},
           "autofreeze": autofreeze}
    if stage == 3:
        cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    if precision == "fp16":
        cfg["fp16"] = {"enabled": True, "loss_scale": loss_scale, "initial_scale_power": 8}
    elif precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    return cfg


FREEZE = {"total_steps": 12, "log_freezes": False,
          "decider": {"name": "schedule", "schedule": [{"fraction": 4 / 12, "num_frozen_blocks": 2}]}}
WATCH = {"total_steps": 8, "log_freezes": False,
         "decider": {"name": "snr", "interval_steps": 4, "min_trainable": 4}}


def train(stage: int, precision: str, autofreeze: dict, steps: int, loss_scale: float = 0, cache_dir=None) -> dict:
    import deepspeed
    import torch
    import ds_autofreeze
    from ds_autofreeze.cache import ActivationCache
    from ds_autofreeze.config import CacheConfig
    model = tiny_bert()
    engine, *_, af = ds_autofreeze.initialize(model=model, config=config(stage, precision, autofreeze, loss_scale))
    if cache_dir is not None:
        af.attach_cache(ActivationCache(CacheConfig(enabled=True), cache_dir, 64, "d"))
    head = model.classifier.weight
    losses, frozen_at, carried = [], {}, None
    torch.manual_seed(123)
    data = batches(8, engine.device)  # an epoch of 8 batches: example ids name the same inputs every epoch
    for step in range(steps):
        b = step % 8
        loss = engine(**data[b], example_ids=torch.arange(8 * b, 8 * b + 8)).loss
        engine.backward(loss)
        engine.step()
        if step + 1 == 4:
            before = _master_and_moment(af, head)
        af.after_step()
        losses.append(loss.item())
        if step + 1 == 4:
            after = _master_and_moment(af, head)
            carried = all(torch.equal(x, y) for x, y in zip(before, after)) if af.num_frozen_blocks else None
            frozen = [p for p in engine.module.parameters() if not p.requires_grad]
            with deepspeed.zero.GatheredParameters(frozen, enabled=stage == 3):
                frozen_at = {n: p.detach().clone() for n, p in engine.module.named_parameters() if not p.requires_grad}
    params = [p for p in engine.module.parameters() if not p.requires_grad]
    with deepspeed.zero.GatheredParameters(params, enabled=stage == 3):
        still = all(torch.equal(p, frozen_at[n]) for n, p in engine.module.named_parameters() if n in frozen_at)
    out = {"losses": losses, "frozen_unchanged": still, "state_carried": carried, "frozen": af.num_frozen_blocks,
           "log": af.decider.log if af.decider is not None else None, "optimizer": type(engine.optimizer).__name__}
    af.close()
    return out


def _master_and_moment(af, param):
    layout = af.repartitioner.layout
    frags = [f for f in layout.fragments() if f.param is param]
    state = layout.inner.state
    return [f.view(f.tensor.data).clone() for f in frags] + \
        [f.view(state[f.tensor]["exp_avg"]).clone() for f in frags if f.tensor in state]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", os.path.join(ROOT, "bench", "results")),
                                                 "gpu_checks.json"))
    args = p.parse_args()
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29571")
    import torch
    rows, results = [], {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
    for stage, precision in [(0, "fp16"), (1, "fp16"), (2, "fp16"), (3, "fp16"), (1, "bf16"), (2, "bf16"),
                             (3, "bf16")]:
        name = f"zero{stage}-{precision}"
        try:
            r = train(stage, precision, FREEZE, 12)
            ok = r["frozen"] == 2 and r["frozen_unchanged"] and r["state_carried"] is not False and \
                all(x == x for x in r["losses"])
            results[name] = r
            rows.append(f"| {name} | {r['optimizer']} | {'ok' if ok else 'FAILED'} | frozen unchanged "
                        f"{r['frozen_unchanged']}, state carried {r['state_carried']}, last loss {r['losses'][-1]:.4f} |")
        except Exception as err:  # noqa: BLE001 - a refusal or a failure is what this row reports
            results[name] = {"error": f"{type(err).__name__}: {err}"}
            rows.append(f"| {name} | | error | {type(err).__name__}: {str(err)[:150]} |")
    try:  # statistics of two fp16 runs whose static loss scales differ 256x
        low, high = (train(2, "fp16", WATCH, 8, loss_scale=s)["log"] for s in (16.0, 4096.0))
        worst = max(abs(a - b) / max(abs(b), 1e-12) for x, y in zip(low, high)
                    for key in ("grad_sum_sq", "grad_sq_sum") for a, b in zip(x["stats"][key], y["stats"][key]))
        results["loss_scale_relative_difference"] = worst
        rows.append(f"| statistics, fp16 loss scale 16 vs 4096 (ZeRO-2) | | {'ok' if worst < 0.05 else 'FAILED'} | "
                    f"largest relative difference of gradient moments {worst:.2e} |")
    except Exception as err:  # noqa: BLE001
        rows.append(f"| statistics, fp16 loss scales | | error | {type(err).__name__}: {str(err)[:150]} |")
    with tempfile.TemporaryDirectory() as tmp:
        plain = train(1, "bf16", FREEZE, 24)["losses"]
        cached = train(1, "bf16", FREEZE, 24, cache_dir=tmp)["losses"]
    results["cache_exact_bf16"] = plain == cached
    rows.append(f"| cache exact (bf16, ZeRO-1) | | {'ok' if plain == cached else 'FAILED'} | "
                f"24 steps, losses equal: {plain == cached} |")
    try:
        from ds_autofreeze.statistics import _chunk_sums
        g = torch.Generator().manual_seed(0)
        tensors = [torch.randn(n, generator=g) for n in (1, 1000, 590_000, 2_400_000)]  # the last: 3 chunks
        worst = 0.0
        for of in ("squares", "abs", "values"):
            src = [t.abs() if of == "values" else t for t in tensors]
            cpu, gpu = _chunk_sums(src, of), _chunk_sums([t.cuda() for t in src], of).cpu()
            worst = max(worst, ((gpu - cpu).abs() / cpu.abs()).max().item())
        results["chunk_sums_relative_difference"] = worst
        rows.append(f"| statistics' sums, CUDA (fused) vs CPU | | {'ok' if worst < 1e-5 else 'FAILED'} | "
                    f"largest relative difference {worst:.2e} |")
    except Exception as err:  # noqa: BLE001
        rows.append(f"| statistics' sums, CUDA vs CPU | | error | {type(err).__name__}: {str(err)[:150]} |")
    table = "\n".join([f"GPU checks on {results['device']}", "", "| check | optimizer | result | detail |",
                       "|---|---|---|---|", *rows])
    print(table)
    results["table"] = table
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    main()
