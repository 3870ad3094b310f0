"""AutoFreezeEngine on two real ranks (gloo): collective bytes, bit-identity, a plain PyTorch DDP
reference, checkpoints on the same and on another world size, and a rank that dies."""
from __future__ import annotations

import os
import time

import pytest
import torch

from conftest import batches, ds_config, tiny_bert
from multirank import run_ranks

SCHEDULE = {"total_steps": 10, "decider": {"name": "schedule", "schedule": [
    {"fraction": 0.3, "num_frozen_blocks": 1}, {"fraction": 0.6, "num_frozen_blocks": 3}]}}  # steps 3 and 6
FREEZE_AT = {3: 1, 6: 3}
STEPS, ACCUM, SAVE_AT = 8, 2, 5
# Gradient reduction ops; the parameter all-gather after a ZeRO-1/2 step is counted apart.
GRAD_OPS = ("all_reduce", "all_reduce_coalesced", "reduce", "reduce_scatter", "reduce_scatter_tensor")
# Besides the gradients each step reduces the global gradient norm (clipping: one fp32) and,
# with bf16, an overflow flag: a few bytes that do not depend on the model.
FIXED_OVERHEAD = 16


def _engine(stage: int, autofreeze: dict = SCHEDULE, bf16: bool = False, micro: int = 4, accum: int = ACCUM):
    import ds_autofreeze
    config = ds_config(stage, autofreeze, micro=micro, accum=accum)
    if bf16:
        config["bf16"] = {"enabled": True}
    if stage == 3:  # the tiny model's parameters are all below DeepSpeed's default threshold: none would be partitioned
        config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    engine, *_ = ds_autofreeze.initialize(model=tiny_bert(), config=config)
    return engine


def _grad_bytes(engine, trainable: bool = True) -> int:
    return sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in engine.module.parameters()
               if p.requires_grad == trainable)


def _full_params(engine) -> dict[str, torch.Tensor]:
    """Every parameter's full value (ZeRO-3 holds partitions: gather them for the copy)."""
    import deepspeed
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=engine.zero_optimization_partition_weights()):
        return {n: p.detach().clone() for n, p in engine.module.named_parameters()}


def _train(engine, data, on_step=None) -> list[dict]:
    from ds_autofreeze.comm_stats import CollectiveCounter
    records = []
    for batch in data:
        trainable, frozen = _grad_bytes(engine), engine.num_frozen_blocks
        with CollectiveCounter() as comm:
            loss = engine(**batch).loss
            engine.backward(loss)
            boundary = engine.is_gradient_accumulation_boundary()
            engine.step()
        records.append({"loss": loss.item(), "trainable_bytes": trainable, "boundary": boundary,
                        "grad_bytes": sum(comm.bytes[op] for op in GRAD_OPS),
                        "gather_bytes": comm.bytes["all_gather_into_tensor"],
                        "froze": engine.num_frozen_blocks != frozen})
        if boundary and on_step:
            on_step(engine.global_steps)
    return records


def _ddp_reference(rank: int, data, freeze_at: dict[int, int]) -> list[float]:
    """Plain PyTorch DDP: AdamW, accumulation under no_sync, global-norm clipping at 1.0, and at
    the given steps the prefix frozen (requires_grad off + eval) and DDP rebuilt over the rest."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    from ds_autofreeze.model_adapter import ModelAdapter
    model = tiny_bert()
    adapter = ModelAdapter(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    ddp, losses = DDP(model), []
    model.train()
    torch.manual_seed(123)
    for i, batch in enumerate(data):
        last = (i + 1) % ACCUM == 0
        if last:
            loss = ddp(**batch).loss
            (loss / ACCUM).backward()
        else:
            with ddp.no_sync():
                loss = ddp(**batch).loss
                (loss / ACCUM).backward()
        losses.append(loss.item())
        if last:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step = (i + 1) // ACCUM
            if step in freeze_at:
                adapter.set_frozen(freeze_at[step])
                ddp = DDP(model)  # DDP's reducer is built for a fixed set of trainable parameters
    return losses


def two_rank_run(rank: int, world: int, stage: int, bf16: bool, ckpt_dir: str) -> dict:
    engine = _engine(stage, bf16=bf16)
    data = batches(STEPS * ACCUM, seed=rank + 1)  # each rank its own data
    frozen_at_freeze: dict[str, torch.Tensor] = {}

    def on_step(step: int) -> None:
        if step == SAVE_AT:
            engine.save_checkpoint(ckpt_dir, tag="mid", client_state={"rng": torch.get_rng_state()})
        if step in FREEZE_AT:
            frozen_at_freeze.update({n: p for n, p in _full_params(engine).items()
                                     if not dict(engine.module.named_parameters())[n].requires_grad
                                     and n not in frozen_at_freeze})

    torch.manual_seed(123)  # dropout stream
    records = _train(engine, data, on_step)
    final = _full_params(engine)
    events = [(e["step"], e["frozen_blocks"]) for e in engine.freeze_events]

    resumed = _engine(stage, bf16=bf16)
    _, client = resumed.load_checkpoint(ckpt_dir, tag="mid")
    torch.set_rng_state(client["rng"])
    resumed_records = _train(resumed, data[SAVE_AT * ACCUM:])
    resumed_final = _full_params(resumed)
    reference = None if bf16 else _ddp_reference(rank, data, FREEZE_AT)
    return {"records": records, "final": final, "events": events, "frozen_at_freeze": frozen_at_freeze,
            "resumed_losses": [r["loss"] for r in resumed_records], "resumed_final": resumed_final,
            "reference": reference}


@pytest.mark.parametrize("stage,bf16", [(0, False), (1, False), (2, False), (2, True), (3, False)])
def test_two_ranks(stage, bf16, tmp_path):
    ranks = run_ranks(two_rank_run, 2, stage, bf16, str(tmp_path))
    r0, r1 = ranks
    # Every rank froze the same blocks at the same optimizer steps.
    assert r0["events"] == r1["events"] == sorted(FREEZE_AT.items())
    for r in ranks:
        # Frozen parameters never moved after their freeze, and the ranks agree bit for bit.
        for name, value in r["frozen_at_freeze"].items():
            assert torch.equal(r["final"][name], value), name
        for name in r0["final"]:
            assert torch.equal(r["final"][name], r0["final"][name]), name
        # Gradient traffic is the trainable gradients (plus a few fixed bytes), before and after
        # each freeze. ZeRO-2/3 reduce every micro-batch, stages 0/1 once per optimizer step.
        for i, rec in enumerate(r["records"]):
            if rec["froze"]:
                continue  # the repartition's one-off gathers ride in this step
            reduces = stage >= 2 or rec["boundary"]
            expected = rec["trainable_bytes"] if reduces else 0
            assert expected <= rec["grad_bytes"] <= expected + FIXED_OVERHEAD * reduces, (i, rec)
            if stage in (1, 2) and rec["boundary"]:  # updated trainable parameters are all-gathered, padded
                assert rec["trainable_bytes"] <= rec["gather_bytes"] <= rec["trainable_bytes"] * 1.01 + 64, (i, rec)
        before = [rec["trainable_bytes"] for rec in r["records"]]
        assert before[0] > before[-1] and len(set(before)) == 3  # three trainable sets: full, after 1, after 3
        # Resumed from the step-5 checkpoint (after a freeze, mid-interval): bit-identical.
        assert r["resumed_losses"] == [rec["loss"] for rec in r["records"][SAVE_AT * ACCUM:]]
        for name in r["final"]:
            assert torch.equal(r["resumed_final"][name], r["final"][name]), name
        if r["reference"] is not None:
            losses = torch.tensor([rec["loss"] for rec in r["records"]], dtype=torch.float64)
            torch.testing.assert_close(losses, torch.tensor(r["reference"], dtype=torch.float64), rtol=1e-5, atol=0)


def zero3_gathers(rank: int, world: int, cache_dir: str | None) -> dict:
    """ZeRO-3, blocks 0-1 frozen from the start; epoch 1 fills the cache (if any), epoch 2 is timed."""
    from ds_autofreeze.cache import ActivationCache
    from ds_autofreeze.comm_stats import CollectiveCounter
    from ds_autofreeze.config import CacheConfig
    engine = _engine(3, {"decider": {"name": "static", "num_frozen_blocks": 2}}, accum=1)
    if cache_dir:
        engine.attach_cache(ActivationCache(CacheConfig(enabled=True), cache_dir, 64, "d", writer=f"rank{rank}"))
    data = batches(4, seed=rank + 1)
    torch.manual_seed(123)
    losses, epoch2 = [], []
    for epoch in range(2):
        for b, batch in enumerate(data):
            with CollectiveCounter() as comm:
                loss = engine(**batch, example_ids=torch.arange(4) + 4 * b + 16 * rank).loss
                engine.backward(loss)
                engine.step()
            losses.append(loss.item())
            if epoch:
                epoch2.append({op: comm.bytes[op] for op in ("all_gather_into_tensor", "reduce_scatter_tensor")})
    return {"losses": losses, "epoch2": epoch2, "trainable": _grad_bytes(engine), "frozen": _grad_bytes(engine, False)}


def test_zero3_frozen_blocks_are_not_gathered_when_the_cache_serves_them(tmp_path):
    plain = run_ranks(zero3_gathers, 2, None)
    cached = run_ranks(zero3_gathers, 2, str(tmp_path))
    for p, c in zip(plain, cached):
        assert c["losses"] == p["losses"]  # the cached path is exact under ZeRO-3 too
        for without, with_cache in zip(p["epoch2"], c["epoch2"]):
            assert without["reduce_scatter_tensor"] == with_cache["reduce_scatter_tensor"] == c["trainable"]
            # Without the cache the frozen blocks still run forward (gathered once per step, not
            # released in between); with it they never run, and only trainable blocks are
            # gathered (forward, and again for backward).
            assert without["all_gather_into_tensor"] >= c["frozen"]
            assert with_cache["all_gather_into_tensor"] <= 2 * c["trainable"] * 1.01 + 1024


GRADNORM = {"total_steps": 100, "decider": {"name": "gradnorm", "num_intervals": 50}}  # decisions every 2 steps


def _full_state(engine) -> dict:
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    state = {}
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:
            continue
        if engine.zero_optimization_stage() == 0:  # the torch optimizer holds the parameter itself
            moments = engine.optimizer.state[p]
            state[name] = [p.detach().clone(), moments["exp_avg"].clone(), moments["exp_avg_sq"].clone()]
        else:
            state[name] = [safe_get_full_fp32_param(p)] + [safe_get_full_optimizer_state(p, key)
                                                           for key in ("exp_avg", "exp_avg_sq")]
    return state


def save_run(rank: int, world: int, stage: int, ckpt_dir: str) -> dict:
    """Freeze a block, train 3 steps (a decision at 2, gradient sums pending for 3), save."""
    engine = _engine(stage, GRADNORM, micro=8 // world, accum=1)
    engine.freeze_and_repartition(1)
    for batch in batches(3, micro=8 // world, seed=rank + 1):
        engine.backward(engine(**batch).loss)
        engine.step()
    engine.save_checkpoint(ckpt_dir, tag="t")
    return {"state": _full_state(engine), "grad_acc": engine._grad_acc.clone(),
            "lr": [g["lr"] for g in engine.optimizer.param_groups]}


def load_run(rank: int, world: int, stage: int, ckpt_dir: str) -> dict:
    engine = _engine(stage, GRADNORM, micro=8 // world, accum=1)
    engine.load_checkpoint(ckpt_dir, tag="t")
    out = {"state": _full_state(engine), "grad_acc": engine._grad_acc.clone(), "steps": engine.global_steps,
           "frozen": engine.num_frozen_blocks, "lr": [g["lr"] for g in engine.optimizer.param_groups]}
    batch = batches(1, micro=8 // world, seed=7)[0]
    loss = engine(**batch).loss
    engine.backward(loss)
    engine.step()
    out["next_loss"] = loss.item()
    return out


def _in_process(fn, *args):
    """World size 1 in this test process (the session's process group)."""
    return [fn(0, 1, *args)]


@pytest.mark.parametrize("stage,saved_world,loaded_world", [(2, 2, 1), (1, 1, 2), (0, 2, 1)])
def test_resume_on_another_world_size(stage, saved_world, loaded_world, tmp_path):
    run = {1: _in_process, 2: lambda fn, *a: run_ranks(fn, 2, *a)}
    saved = run[saved_world](save_run, stage, str(tmp_path))
    loaded = run[loaded_world](load_run, stage, str(tmp_path))
    for r in loaded:
        assert (r["steps"], r["frozen"]) == (3, 1)
        assert r["lr"] == saved[0]["lr"]
        assert r["state"].keys() == saved[0]["state"].keys()
        for name, tensors in saved[0]["state"].items():
            for got, want in zip(r["state"][name], tensors):
                assert torch.equal(got, want), name
        # The pending gradient sums: every new rank holds the old ranks' mean (what decisions use).
        mean = torch.stack([s["grad_acc"] for s in saved]).mean(0)
        assert torch.equal(r["grad_acc"], mean)
        assert torch.isfinite(torch.tensor(r["next_loss"]))


def gradnorm_stats(rank: int, world: int) -> dict:
    engine = _engine(0, GRADNORM, accum=1)
    for batch in batches(1, seed=rank + 1):
        engine.backward(engine(**batch).loss)
        # Before the step: the decision at step 2 would consume the sums.
        local = engine._grad_acc.clone()
        engine.step()
    return {"local": local, "slices": engine._grad_acc_slices, "norms": engine._block_grad_norms()}


def test_gradnorm_statistics_are_all_reduced():
    ranks = run_ranks(gradnorm_stats, 2)
    assert ranks[0]["norms"] == ranks[1]["norms"]
    assert not torch.equal(ranks[0]["local"], ranks[1]["local"])  # different data per rank
    mean = (ranks[0]["local"] + ranks[1]["local"]) / 2
    expected = [mean[a:b].abs().sum().item() for a, b in ranks[0]["slices"]]
    assert ranks[0]["norms"] == pytest.approx(expected, rel=1e-6)


def rank_dies(rank: int, world: int) -> dict:
    engine = _engine(2, SCHEDULE, accum=1)
    start = None
    try:
        for step, batch in enumerate(batches(20, seed=rank + 1), 1):
            if step == 4 and rank == 1:
                os._exit(17)  # no cleanup, no goodbye: as a killed process
            if step == 4:
                start = time.monotonic()
            engine.backward(engine(**batch).loss)
            engine.step()
    except Exception as err:  # noqa: BLE001 - what the survivor sees is the point of the test
        return {"error": f"{type(err).__name__}: {err}", "seconds": time.monotonic() - start}
    return {"error": None}


def test_a_dead_rank_makes_the_others_fail_fast():
    survivor, dead = run_ranks(rank_dies, 2, timeout=120, allow_missing=True)
    assert dead is None
    assert survivor["error"] is not None, "the surviving rank finished training alone"
    assert survivor["seconds"] < 60, survivor
