"""AutoFreeze on two real ranks (gloo): collective bytes, bit-identity, a plain PyTorch DDP
reference, checkpoints on the same and on another world size, and a rank that dies."""
from __future__ import annotations

import math
import os
import time

import pytest
import torch

from conftest import adam_reading, batches, clip_rescale, ds_config, tiny_bert
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
# Below the tiny model's gradient norms, so clipping acts at every step and its rescale at each freeze
# (the default rescale_clipping) moves the losses the DDP reference is compared with.
CLIP = 0.1


def _engine(stage: int, autofreeze: dict = SCHEDULE, bf16: bool = False, micro: int = 4, accum: int = ACCUM):
    import ds_autofreeze
    config = {**ds_config(stage, autofreeze, micro=micro, accum=accum), "gradient_clipping": CLIP}
    if bf16:
        config["bf16"] = {"enabled": True}
    if stage == 3:  # the tiny model's parameters are all below DeepSpeed's default threshold: none would be partitioned
        config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    engine, *_, af = ds_autofreeze.initialize(model=tiny_bert(), config=config)
    return engine, af


def _grad_bytes(engine, trainable: bool = True) -> int:
    return sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in engine.module.parameters()
               if p.requires_grad == trainable)


def _full_params(engine) -> dict[str, torch.Tensor]:
    """Every parameter's full value (ZeRO-3 holds partitions: gather them for the copy)."""
    import deepspeed
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=engine.zero_optimization_partition_weights()):
        return {n: p.detach().clone() for n, p in engine.module.named_parameters()}


def _train(engine, af, data, on_step=None) -> list[dict]:
    from ds_autofreeze.comm_stats import CollectiveCounter
    records = []
    for batch in data:
        trainable, frozen = _grad_bytes(engine), af.num_frozen_blocks
        with CollectiveCounter() as comm:
            loss = engine(**batch).loss
            engine.backward(loss)
            boundary = engine.is_gradient_accumulation_boundary()
            engine.step()
            af.after_step()
        records.append({"loss": loss.item(), "trainable_bytes": trainable, "boundary": boundary,
                        "grad_bytes": sum(comm.bytes[op] for op in GRAD_OPS),
                        "gather_bytes": comm.bytes["all_gather_into_tensor"],
                        "froze": af.num_frozen_blocks != frozen})
        if boundary and on_step:
            on_step(engine.global_steps)
    return records


def _ddp_reference(rank: int, data, freeze_at: dict[int, int], decisions_every: int = 0) -> list[float]:
    """Plain PyTorch DDP: AdamW, accumulation under no_sync, global-norm clipping at CLIP, and at
    the given steps the prefix frozen (requires_grad off + eval), the threshold rescaled (the
    default ``rescale_clipping``; DeepSpeed sums the ranks' partitions of the moments, DDP holds
    them whole; with ``decisions_every``, by their change since the last decision: ``rescale_from``
    "interval") and DDP rebuilt over the rest."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    from ds_autofreeze.model_adapter import ModelAdapter
    model = tiny_bert()
    adapter = ModelAdapter(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    ddp, losses, clip, previous = DDP(model), [], CLIP, None
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
            trainable = [p for p in model.parameters() if p.requires_grad]
            torch.nn.utils.clip_grad_norm_(trainable, clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step = (i + 1) // ACCUM
            if step in freeze_at:
                adapter.set_frozen(freeze_at[step])
                clip *= clip_rescale(opt, trainable, previous)
                ddp = DDP(model)  # DDP's reducer is built for a fixed set of trainable parameters
            if decisions_every and (step in freeze_at or step % decisions_every == 0):
                previous = adam_reading(opt, trainable, step)  # freezing leaves the moments as they are
    return losses


def two_rank_run(rank: int, world: int, stage: int, bf16: bool, ckpt_dir: str) -> dict:
    engine, af = _engine(stage, bf16=bf16)
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
    records = _train(engine, af, data, on_step)
    final = _full_params(engine)
    events = [(e["step"], e["frozen_blocks"]) for e in af.freeze_events]

    resumed, resumed_af = _engine(stage, bf16=bf16)
    _, client = resumed.load_checkpoint(ckpt_dir, tag="mid")
    torch.set_rng_state(client["rng"])
    resumed_records = _train(resumed, resumed_af, data[SAVE_AT * ACCUM:])
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


def interval_rescale_run(rank: int, world: int, stage: int) -> dict:
    engine, af = _engine(stage, {"decider": {"name": "gradnorm", "interval_steps": 2}, "rescale_from": "interval"})
    data = batches(24, seed=rank + 1)  # 12 optimizer steps
    torch.manual_seed(123)
    losses = [r["loss"] for r in _train(engine, af, data)]
    freeze_at = {e["step"]: e["frozen_blocks"] for e in af.freeze_events}
    return {"losses": losses, "freeze_at": freeze_at, "reference": _ddp_reference(rank, data, freeze_at, 2)}


def test_two_ranks_rescale_clipping_by_the_last_interval():
    """rescale_from "interval" on ZeRO-2: the change of Adam's second moments since the last decision,
    summed over the ranks' partitions, rescales the threshold as DDP's whole moments say."""
    r0, r1 = run_ranks(interval_rescale_run, 2, 2)
    assert r0["freeze_at"] == r1["freeze_at"] and min(r0["freeze_at"]) > 2  # a decision to difference with
    for r in (r0, r1):
        torch.testing.assert_close(torch.tensor(r["losses"], dtype=torch.float64),
                                   torch.tensor(r["reference"], dtype=torch.float64), rtol=1e-5, atol=0)


def zero3_gathers(rank: int, world: int, cache_dir: str | None, replicate: bool) -> dict:
    """ZeRO-3, blocks 0-1 frozen from the start; epoch 1 fills the cache (if any), epoch 2 is counted."""
    from ds_autofreeze.cache import ActivationCache
    from ds_autofreeze.comm_stats import CollectiveCounter
    from ds_autofreeze.config import CacheConfig
    engine, af = _engine(3, {"decider": {"name": "static", "num_frozen_blocks": 2},
                             "replicate_frozen_weights": replicate}, accum=1)
    if cache_dir:
        af.attach_cache(ActivationCache(CacheConfig(enabled=True), cache_dir, 64, "d", writer=f"rank{rank}"))
    data = batches(4, seed=rank + 1)
    torch.manual_seed(123)
    losses, epoch2 = [], []
    for epoch in range(2):
        for b, batch in enumerate(data):
            with CollectiveCounter() as comm:
                loss = engine(**batch, example_ids=torch.arange(4) + 4 * b + 16 * rank).loss
                engine.backward(loss)
                engine.step()
                af.after_step()
            losses.append(loss.item())
            if epoch:
                epoch2.append({op: comm.bytes[op] for op in ("all_gather_into_tensor", "reduce_scatter_tensor")})
    af.close()
    return {"losses": losses, "epoch2": epoch2, "trainable": _grad_bytes(engine), "frozen": _grad_bytes(engine, False)}


def test_zero3_frozen_blocks_leave_the_per_step_gathers(tmp_path):
    """DeepSpeed gathers every weight for each forward, frozen ones too. Served from the cache, or run
    on copies gathered once at the freeze (replicate_frozen_weights), the frozen blocks are never
    gathered; only the trainable blocks are (forward, and again for backward). Same losses."""
    gathered = run_ranks(zero3_gathers, 2, None, False)
    runs = {"cache": run_ranks(zero3_gathers, 2, str(tmp_path), False),
            "replicated": run_ranks(zero3_gathers, 2, None, True),
            "replicated+cache": run_ranks(zero3_gathers, 2, str(tmp_path / "r"), True)}
    for name, ranks in runs.items():
        for g, r in zip(gathered, ranks):
            assert r["losses"] == g["losses"], name  # exact under ZeRO-3 too
            for without, served in zip(g["epoch2"], r["epoch2"]):
                assert without["reduce_scatter_tensor"] == served["reduce_scatter_tensor"] == r["trainable"]
                assert without["all_gather_into_tensor"] >= r["frozen"]
                assert served["all_gather_into_tensor"] <= 2 * r["trainable"] * 1.01 + 1024, name


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
    engine, af = _engine(stage, GRADNORM, micro=8 // world, accum=1)
    af.freeze(1)
    for batch in batches(3, micro=8 // world, seed=rank + 1):
        engine.backward(engine(**batch).loss)
        engine.step()
        af.after_step()
    engine.save_checkpoint(ckpt_dir, tag="t")
    return {"state": _full_state(engine), "sums": af.controller.moments.state_dict(),
            "lr": [g["lr"] for g in engine.optimizer.param_groups]}


def load_run(rank: int, world: int, stage: int, ckpt_dir: str) -> dict:
    engine, af = _engine(stage, GRADNORM, micro=8 // world, accum=1)
    engine.load_checkpoint(ckpt_dir, tag="t")
    out = {"state": _full_state(engine), "sums": af.controller.moments.state_dict(), "steps": engine.global_steps,
           "frozen": af.num_frozen_blocks, "lr": [g["lr"] for g in engine.optimizer.param_groups]}
    batch = batches(1, micro=8 // world, seed=7)[0]
    loss = engine(**batch).loss
    engine.backward(loss)
    engine.step()
    af.after_step()
    out["next_loss"] = loss.item()
    out["decision"] = af.decider.log[-1]
    return out


def _in_process(fn, *args):
    """World size 1 in this test process (the session's process group)."""
    return [fn(0, 1, *args)]


@pytest.mark.parametrize("stage,saved_world,loaded_world", [(2, 2, 1), (1, 1, 2), (0, 2, 1), (2, 2, 2)])
def test_resume_on_another_world_size(stage, saved_world, loaded_world, tmp_path):
    run = {1: _in_process, 2: lambda fn, *a: run_ranks(fn, 2, *a)}
    saved = run[saved_world](save_run, stage, str(tmp_path))
    loaded = run[loaded_world](load_run, stage, str(tmp_path))
    for rank, r in enumerate(loaded):
        assert (r["steps"], r["frozen"]) == (3, 1)
        assert r["lr"] == saved[0]["lr"]
        assert r["state"].keys() == saved[0]["state"].keys()
        for name, tensors in saved[0]["state"].items():
            for got, want in zip(r["state"][name], tensors):
                assert torch.equal(got, want), name
        # The pending gradient sums lie on each rank's own partition: on the same world size they
        # are restored as saved; on another one the interval starts over, and the next decision
        # (step 4) says it covers the one step since the resume.
        if saved_world == loaded_world:
            assert all(torch.equal(a, b) for a, b in zip(r["sums"]["sums"], saved[rank]["sums"]["sums"]))
            assert r["decision"]["stats"]["steps"] == 2
        else:
            assert all(not t.any() for t in r["sums"]["sums"]) and r["decision"]["stats"]["steps"] == 1
        assert torch.isfinite(torch.tensor(r["next_loss"]))


WATCH = {"total_steps": 6, "log_statistics": True, "decider": {"name": "snr", "interval_steps": 3, "min_trainable": 4}}


def watch_stats(rank: int, world: int, stage: int) -> dict:
    """Every statistic over 6 steps of a global batch of 8 (this rank's share of it), dropout off."""
    import deepspeed
    import ds_autofreeze
    config = ds_config(stage, WATCH, micro=8 // world, accum=1)
    if stage == 3:
        config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    engine, *_ = deepspeed.initialize(model=tiny_bert(dropout=0.0), config=config)
    af = ds_autofreeze.attach(engine, WATCH)
    probe = {k: v for k, v in batches(1, micro=8, seed=9)[0].items() if k != "labels"}
    af.set_probe({k: v[rank * 8 // world:(rank + 1) * 8 // world] for k, v in probe.items()})  # this rank's shard
    accumulator = af.controller.moments.nbytes()  # before the first interval is kept for replay
    progress_bytes = 0
    for batch in batches(6, micro=8, seed=3):
        mine = {k: v[rank * 8 // world:(rank + 1) * 8 // world] for k, v in batch.items()}
        engine.backward(engine(**mine).loss)
        engine.step()
        progress_bytes = max(progress_bytes, af.controller.progress.nbytes())
        af.after_step()
    block_params = sum(getattr(p, "ds_numel", p.numel()) for b in range(4) for p in af.adapter.block_parameters(b))
    return {"log": af.decider.log, "bytes": accumulator, "progress_bytes": progress_bytes, "block_params": block_params,
            "trainable": af.trainable_parameter_count()}


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_partitioned_statistics_equal_unpartitioned_ones(stage):
    """Two ranks, each summing only the gradient elements it holds (and measuring its shard of the
    probe set), log what one rank holding all of them logs. Each rank's accumulator holds the block
    elements of its own partition: together one float per block parameter, each at most 4 bytes x
    trainable parameters / world size."""
    one = _in_process(watch_stats, stage)[0]
    two = run_ranks(watch_stats, 2, stage)
    for r in two:
        assert len(r["log"]) == len(one["log"]) == 2
        for got, want in zip(r["log"], one["log"]):
            for key in ("grad_l1", "grad_sum_sq", "grad_sq_sum", "adam_m2", "adam_v", "grad_sq_recent", "drift",
                        "progress_rest"):
                assert got["stats"][key] == pytest.approx(want["stats"][key], rel=1e-4), key
            for got_b, want_b in zip(got["stats"]["progress"], want["stats"]["progress"]):
                assert got_b == pytest.approx(want_b, rel=1e-3, abs=1e-9)
            assert got["stats"]["steps"] == 3
        # Progress: a float per block and the rest, per step of an interval (3) and the one building.
        assert r["progress_bytes"] <= 8 * (4 + 1) * (3 + 1)
        # ZeRO pads partitions to an alignment; Q and the recent scale are two floats per block.
        assert r["bytes"] <= 4 * r["trainable"] / 2 + 4 * 64 + 2 * 8 * 4
    assert sum(r["bytes"] for r in two) == 4 * one["block_params"] + 2 * 2 * 8 * 4
    assert two[0]["log"] == two[1]["log"]


def rank_dies(rank: int, world: int) -> dict:
    engine, af = _engine(2, SCHEDULE, accum=1)
    start = None
    try:
        for step, batch in enumerate(batches(20, seed=rank + 1), 1):
            if step == 4 and rank == 1:
                os._exit(17)  # no cleanup, no goodbye: as a killed process
            if step == 4:
                start = time.monotonic()
            engine.backward(engine(**batch).loss)
            engine.step()
            af.after_step()
    except Exception as err:  # noqa: BLE001 - what the survivor sees is the point of the test
        return {"error": f"{type(err).__name__}: {err}", "seconds": time.monotonic() - start}
    return {"error": None}


def test_a_dead_rank_makes_the_others_fail_fast():
    survivor, dead = run_ranks(rank_dies, 2, timeout=120, allow_missing=True)
    assert dead is None
    assert survivor["error"] is not None, "the surviving rank finished training alone"
    assert survivor["seconds"] < 60, survivor


def synthetic_run(rank: int, world: int, decay: bool, estimator: str, reference: str = "v", rising: bool = False,
                  decisions: int = 100, interval: int = 10) -> dict:
    """The snr decider on gradients made up on purpose: the loss is sum_b <w_b, mu_b(t) + s(t) noise>,
    so the global gradient of block b is mu_b(t) plus zero-mean noise (each rank its own). Without
    ``decay`` mu is zero: pure noise. With it mu_b(t) = exp(-t / tau_b) with tau growing with b: the
    front blocks stop learning first. The noise scale s is 1, or with ``rising`` grows 4x over the
    first tenth of the run, then falls to a tenth of that (as block 0's did on the watch runs)."""
    import deepspeed
    import ds_autofreeze
    total = decisions * interval
    af_config = {"total_steps": total, "log_freezes": False,
                 "decider": {"name": "snr", "estimator": estimator, "adam_reference": reference,
                             "interval_steps": interval, "min_trainable": 1}}
    config = ds_config(0, af_config, micro=1, accum=1, scheduler={
        "type": "WarmupDecayLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": 1e-3, "warmup_num_steps": interval,
                                            "total_num_steps": total}})
    engine, *_ = deepspeed.initialize(model=tiny_bert(), config=config)
    af = ds_autofreeze.attach(engine, af_config)
    blocks = [af.adapter.block_parameters(b) for b in range(af.num_blocks)]
    g = torch.Generator().manual_seed(1000 + rank)
    for t in range(total):
        loss = 0.0
        rise = total // 10
        scale = (1 + 3 * t / rise if t < rise else 0.4 + 3.6 * math.exp(-(t - rise) / rise)) if rising else 1.0
        for b, params in enumerate(blocks):
            if not params[0].requires_grad:
                continue
            mean = math.exp(-t / (total * (b + 1) / 8)) if decay else 0.0
            for p in params:
                loss = loss + (p * (mean + scale * torch.randn(p.shape, generator=g))).sum()
        engine.backward(loss)
        engine.step()
        af.after_step()
    return {"events": [(e["step"], e["frozen_blocks"]) for e in af.freeze_events], "decisions": len(af.decider.log)}


@pytest.mark.parametrize("world,estimator,reference,rising", [
    (1, "moments", "v", False), (2, "moments", "v", False), (1, "adam", "v", False), (2, "adam", "v", False),
    (1, "adam", "recent", True), (2, "adam", "recent", True)])
def test_snr_decider_on_synthetic_gradients(world, estimator, reference, rising):
    run = (lambda fn, *a: _in_process(fn, *a)) if world == 1 else (lambda fn, *a: run_ranks(fn, 2, *a))
    noise = run(synthetic_run, False, estimator, reference, rising)
    assert all(r["decisions"] == 100 and r["events"] == [] for r in noise)  # pure noise: nothing ever freezes
    decaying = run(synthetic_run, True, estimator, reference, rising)
    for r in decaying:
        steps = [s for s, _ in r["events"]]
        assert r["events"] and r["events"][-1][1] >= 2 and steps == sorted(steps)
    assert all(r["events"] == decaying[0]["events"] for r in decaying)  # ranks agree


@pytest.mark.parametrize("stage,bf16", [(2, False), (2, True), (3, False)])
def test_repartition_peak_memory_stays_within_the_new_optimizer_state(stage, bf16, monkeypatch):
    """2 ranks, a 110M-parameter Llama-shaped model, a third of its blocks frozen after a step: no
    full-tensor gather; each rank's memory at the peak of the repartition exceeds what it held
    before by at most 1.25x the optimizer state (fp32 masters + moments) it holds after it, and
    ends lower than it started."""
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    from engine import repartition_cost
    # Large tensors straight from mmap: freed memory leaves the resident set, so it can be measured.
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    for r in run_ranks(repartition_cost, 2, stage, "100M", bf16, timeout=600):
        assert r["extra"] <= 1.25 * r["state_after"], r
        assert r["after"] < r["before"], r
