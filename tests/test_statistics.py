"""Per-block statistics on one rank: what the deciders read equals a direct computation."""
import math
import os
import sys

import pytest
import torch

import ds_autofreeze
from ds_autofreeze.model_adapter import ModelAdapter
from ds_autofreeze.repartition import OptimizerLayout
from ds_autofreeze.statistics import BlockStats, GradientMoments, adam_moments
from torch.optim.optimizer import register_optimizer_step_pre_hook

from conftest import ROOT, batches, ds_config, tiny_bert

sys.path.insert(0, os.path.join(ROOT, "bench"))


def watch(interval: int, stage: int = 0, steps: int = 8, log_statistics: bool = True, scheduler=None):
    """A run that measures every interval and never freezes (min_trainable = all blocks)."""
    model = tiny_bert(dropout=0.0)
    af = {"total_steps": steps, "log_statistics": log_statistics,
          "decider": {"name": "snr", "interval_steps": interval, "min_trainable": 4}}
    engine, *_, autofreeze = ds_autofreeze.initialize(model=model, config=ds_config(stage, af, scheduler=scheduler))
    autofreeze.set_probe({k: v for k, v in batches(1, micro=4, seed=9)[0].items() if k != "labels"})
    for batch in batches(steps):
        engine.backward(engine(**batch).loss)
        engine.step()
        autofreeze.after_step()
    return [BlockStats.from_json(r["stats"]) for r in autofreeze.decider.log]


def reference(steps: int = 8) -> tuple[list[list[torch.Tensor]], list[list[torch.Tensor]]]:
    """Per step, per block and then the parameters outside the blocks: the clipped gradient the
    optimizer consumed and the update it made (plain PyTorch, same data)."""
    model = tiny_bert(dropout=0.0)
    adapter = ModelAdapter(model)
    groups = [list(adapter.block_parameters(b)) for b in range(4)]
    in_blocks = {id(p) for group in groups for p in group}
    groups.append([p for p in model.parameters() if id(p) not in in_blocks])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    grads, updates = [], []
    for batch in batches(steps):
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        grads.append([torch.cat([p.grad.flatten() for p in group]) for group in groups])
        before = [torch.cat([p.detach().flatten() for p in group]) for group in groups]
        opt.step()
        updates.append([torch.cat([p.detach().flatten() for p in group]) - old for group, old in zip(groups, before)])
        opt.zero_grad(set_to_none=True)
    return grads, updates


@pytest.mark.parametrize("stage", [0, 2])
def test_statistics_gradient_moments_equal_direct_computation(stage):
    logged = watch(interval=4, stage=stage)
    grads, _ = reference()
    for record, window in zip(logged, (grads[:4], grads[4:])):
        assert record.steps == 4
        for b in range(4):
            total = sum(step[b] for step in window)
            assert record.grad_l1[b] == pytest.approx(total.abs().sum().item(), rel=1e-4)
            assert record.grad_sum_sq[b] == pytest.approx(total.dot(total).item(), rel=1e-4)
            assert record.grad_sq_sum[b] == pytest.approx(sum(step[b].dot(step[b]).item() for step in window), rel=1e-4)
            # The recent scale: every step so far, weighted b1^(2i) for the one i steps back.
            weights = [0.81 ** (record.step - 1 - i) for i in range(record.step)]
            recent = sum(w * step[b].dot(step[b]).item() for w, step in zip(weights, grads)) / sum(weights)
            assert record.grad_sq_recent[b] == pytest.approx(recent, rel=1e-4)


@pytest.mark.parametrize("stage", [0, 2])
def test_statistics_update_progress_is_the_next_gradient_against_the_real_update(stage):
    """Each logged progress value is -g(t+1) . dtheta(t) with dtheta the parameters' real change
    (recomputed from Adam's state in the run); an interval ending at step s holds the updates whose
    next gradient it saw: 1..3, then 4..7."""
    logged = watch(interval=4, stage=stage)
    grads, updates = reference()
    for record, updated in zip(logged, (range(1, 4), range(4, 8))):
        for b in range(5):
            got = record.progress[b] if b < 4 else record.progress_rest
            want = [-grads[t][b].double().dot(updates[t - 1][b].double()).item() for t in updated]
            assert got == pytest.approx(want, rel=1e-3, abs=1e-10)
    # Merged intervals hold every update in order.
    assert BlockStats.merge(logged).progress[0] == [*logged[0].progress[0], *logged[1].progress[0]]


def test_statistics_recent_scale_carries_over_a_freeze():
    """A freeze rebuilds the optimizer and its hook; the recent gradient scale of the blocks that stay
    still covers every step since the start, as a direct computation from the gradients each step
    consumed (read by a global optimizer hook, which survives the rebuild)."""
    af = {"total_steps": 8, "log_statistics": True,
          "decider": {"name": "snr", "interval_steps": 4, "min_trainable": 1, "z": 1e-9}}  # never done
    engine, *_, autofreeze = ds_autofreeze.initialize(model=tiny_bert(dropout=0.0), config=ds_config(0, af))
    norms = []
    hook = register_optimizer_step_pre_hook(lambda *_: norms.append(
        [sum(p.grad.double().pow(2).sum().item() for p in autofreeze.adapter.block_parameters(b)) for b in range(2, 4)]))
    try:
        for step, batch in enumerate(batches(8), 1):
            engine.backward(engine(**batch).loss)
            engine.step()
            autofreeze.after_step()
            if step == 2:
                autofreeze.freeze(2)
    finally:
        hook.remove()
    last = BlockStats.from_json(autofreeze.decider.log[-1]["stats"])
    assert last.step == 8 and len(norms) == 8
    weights = [0.81 ** (7 - i) for i in range(8)]
    for j, b in enumerate((2, 3)):
        assert last.grad_sq_recent[b] == pytest.approx(sum(w * n[j] for w, n in zip(weights, norms)) / sum(weights),
                                                       rel=1e-5)


def test_statistics_merged_intervals_equal_one_longer_interval():
    fine, coarse = watch(interval=2), watch(interval=4)
    for i, whole in enumerate(coarse):
        merged = BlockStats.merge(fine[2 * i:2 * i + 2])
        assert merged.steps == whole.steps == 4 and merged.step == whole.step
        for b in range(4):
            assert merged.grad_sum_sq[b] == pytest.approx(whole.grad_sum_sq[b], rel=1e-4)
            assert merged.grad_sq_sum[b] == pytest.approx(whole.grad_sq_sum[b], rel=1e-4)
            assert merged.signal(b) == pytest.approx(whole.signal(b), rel=1e-3, abs=1e-9)
    # The probe drift of the merged interval is the drift since the first part's start.
    assert fine[0].drift is None or all(d is None for d in fine[0].drift)
    merged = BlockStats.merge(fine[2:4])
    assert merged.drift == pytest.approx(coarse[1].drift, rel=1e-4)


def test_statistics_signal_and_noise_are_unbiased_on_synthetic_gradients():
    # K steps of g = mu + noise in d dimensions: signal estimates ||mu||^2, noise estimates tr C.
    g = torch.Generator().manual_seed(0)
    d, k, sigma = 4000, 10, 0.5
    mu = torch.full((d,), 0.01)
    estimates = []
    for _ in range(200):
        steps = mu + sigma * torch.randn(k, d, generator=g)
        a = steps.sum(0)
        stats = BlockStats(step=k, steps=k, grad_l1=[None], grad_sum_sq=[a.dot(a).item()],
                           grad_sq_sum=[steps.pow(2).sum().item()])
        estimates.append((stats.signal(0), stats.noise(0)))
    signal = sum(s for s, _ in estimates) / len(estimates)
    noise = sum(n for _, n in estimates) / len(estimates)
    assert signal == pytest.approx(mu.dot(mu).item(), rel=0.1)
    assert noise == pytest.approx(d * sigma ** 2, rel=0.01)


def test_statistics_adam_moments_are_logged_and_bias_corrected():
    logged = watch(interval=4)
    for record in logged:
        for b in range(4):
            ratio = record.adam_m2[b] / record.adam_v[b]
            assert 0 < ratio <= 1 and math.isfinite(record.adam_snr(b))
    assert logged[0].adam_beta1 == pytest.approx(0.9)


def test_statistics_memory_is_one_float_per_trainable_block_parameter():
    af = {"total_steps": 8, "decider": {"name": "snr", "interval_steps": 2}}  # the adam estimator: Adam's own state
    *_, autofreeze = ds_autofreeze.initialize(model=tiny_bert(), config=ds_config(0, af))
    assert autofreeze.controller.moments is None
    # Against the recent scale: two floats per block (Q and the scale), none per element.
    af["decider"]["adam_reference"] = "recent"
    *_, autofreeze = ds_autofreeze.initialize(model=tiny_bert(), config=ds_config(0, af))
    assert autofreeze.controller.moments.nbytes() == 2 * 8 * 4
    af["decider"]["estimator"] = "moments"
    del af["decider"]["adam_reference"]
    engine, *_, autofreeze = ds_autofreeze.initialize(model=tiny_bert(), config=ds_config(0, af))
    block_params = sum(p.numel() for b in range(4) for p in autofreeze.adapter.block_parameters(b))
    assert autofreeze.controller.moments.nbytes() == 4 * block_params + 2 * 8 * 4
    autofreeze.freeze(2)
    block_params = sum(p.numel() for b in range(2, 4) for p in autofreeze.adapter.block_parameters(b))
    assert autofreeze.controller.moments.nbytes() == 4 * block_params + 2 * 8 * 4


def test_statistics_decision_reductions_copy_no_block():
    # A decision reduces each block's accumulated gradient and Adam's moments to a few floats. Casting a
    # whole tensor to float64 for the sum copied it at twice its size (rank 0's peak at a 100M model's
    # freeze was such a copy of its embedding); the largest allocation must stay below the block's size.
    from torch.profiler import ProfilerActivity, profile
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4_000_000))
    opt = torch.optim.AdamW([p], lr=1e-3)
    moments = GradientMoments(OptimizerLayout(opt), {id(p): 0}, 1)
    p.grad = torch.randn_like(p)
    opt.step()

    def largest_allocation(fn):
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = fn()
        return out, max(e.cpu_memory_usage for e in prof.events())

    (_, l1, a2, q, _), collect_bytes = largest_allocation(lambda: moments.collect([True]))
    (m2, v, _, _), adam_bytes = largest_allocation(lambda: adam_moments(OptimizerLayout(opt), {id(p): 0}, 1, [True]))
    assert max(collect_bytes, adam_bytes) < p.numel() * p.element_size()
    # Chunks summed in float32 (torch's cascade sum), the chunk sums in float64: ~1e-8 of the exact sum.
    g = p.grad.double()
    assert l1[0] == pytest.approx(g.abs().sum().item(), rel=1e-7)
    assert v[0] == pytest.approx(opt.state[p]["exp_avg_sq"].double().sum().item() / (1 - 0.999), rel=1e-7)


@pytest.mark.parametrize("snr", [0.0, 0.2])
def test_adam_snr_is_unbiased_from_the_second_step(snr):
    """Read at step t, Adam's ratio estimates the per-step snr from t = 2 on, not only once the first
    moment's window is full: with the asymptotic noise share c = (1 - b1) / (1 + b1), pure noise read
    as snr 0.19 at step 5 and 0.06 at step 10, enough to arm a block on nothing. At step 1 m and v
    hold the same gradient: no estimate."""
    d = 200_000
    g = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.zeros(d))
    opt = torch.optim.AdamW([p], lr=1e-3)
    mu = torch.randn(d, generator=g) * math.sqrt(snr)  # ||mu||^2 ~ snr x d against tr C = d
    for t in range(1, 31):
        p.grad = mu + torch.randn(d, generator=g)
        opt.step()
        m2, v, beta1, step = adam_moments(OptimizerLayout(opt), {id(p): 0}, 1, [True])
        stats = BlockStats(step=t, steps=1, adam_m2=m2, adam_v=v, adam_beta1=beta1, adam_step=step)
        assert step == t
        if t == 1:
            assert stats.adam_snr(0) is None
        else:
            assert stats.adam_snr(0) == pytest.approx(snr, abs=0.02), t


def test_adam_snr_against_the_recent_scale_reads_pure_noise_as_noise_at_any_scale():
    """Pure noise whose scale rises 3x over 20 steps, then decays to a tenth (the shape of block 0's
    on the watch runs, where the recent mean of ||g||^2 reached 3-5x v's). Against v, the rise reads
    as signal and the decay below zero; against the recent scale, the ratio reads zero throughout."""
    d = 200_000
    g = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.zeros(d))
    opt = torch.optim.AdamW([p], lr=1e-3)
    moments = GradientMoments(OptimizerLayout(opt), {id(p): 0}, 1, sums=False, scale_decay=0.9 ** 2)
    against_v, recent = {}, {}
    for t in range(1, 121):
        scale = 1 + 2 * t / 20 if t <= 20 else 0.3 + 2.7 * math.exp(-(t - 20) / 30)
        p.grad = scale * torch.randn(d, generator=g)
        opt.step()
        moments.advance()
        m2, v, beta1, step = adam_moments(OptimizerLayout(opt), {id(p): 0}, 1, [True])
        stats = BlockStats(step=t, steps=1, adam_m2=m2, adam_v=v, adam_beta1=beta1, adam_step=step,
                           grad_sq_recent=moments.recent_scale([True]))
        if t >= 2:
            against_v[t], recent[t] = stats.adam_snr(0), stats.adam_snr(0, "recent")
    assert max(against_v.values()) > 0.03 and min(against_v.values()) < -0.04  # the bias the reference removes
    assert all(abs(s) < 0.01 for s in recent.values()), recent


def test_warmup_reads_of_adam_leave_the_interval_sums_whole(monkeypatch):
    """With a warmup, the adam estimator reads Adam's ratio after warmup steps between decisions (to
    arm blocks); the gradient sums a watch run logs still cover whole intervals."""
    import ds_autofreeze.controller as controller
    reads = []
    real = controller.adam_moments
    monkeypatch.setattr(controller, "adam_moments", lambda *a: reads.append(1) or real(*a))
    warmup = {"type": "WarmupLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": 1e-3, "warmup_num_steps": 6,
                                             "warmup_type": "linear"}}
    logged = watch(interval=4, scheduler=warmup)
    assert [r.steps for r in logged] == [4, 4]
    assert len(reads) > len(logged)


def test_statistics_cost_a_few_tensor_ops_per_parameter_tensor_not_a_dozen():
    """On a GPU every tensor op is a kernel launch of several microseconds whatever its size: the step
    hook once issued about six per parameter tensor and an Adam read more (32% and 14% of the engine's
    own ops per step on MPNet's 12 blocks, bench/overhead.py). Now, per extra parameter tensor, the
    hook issues one reduction (the rest are foreach and per-block vector ops), an Adam read two;
    views are not counted."""
    from overhead import OpCounter  # bench/overhead.py's counter

    def count(fn, *args):
        with OpCounter() as counter:
            fn(*args)
        return counter.ops

    def costs(layers):
        model = tiny_bert(num_layers=layers)
        adapter = ModelAdapter(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        block_of = {id(p): b for b in range(layers) for p in adapter.block_parameters(b)}
        moments = GradientMoments(OptimizerLayout(opt), block_of, layers, sums=True, scale_decay=0.81)
        hook, counted = moments._on_step, {}
        moments._handle.remove()
        moments._handle = opt.register_step_pre_hook(lambda *a: counted.update(hook=count(hook, *a)))
        model(**batches(1)[0]).loss.backward()
        opt.step()
        counted["adam"] = count(adam_moments, OptimizerLayout(opt), block_of, layers, [True] * layers)
        # and the sums are still the sums
        direct = [sum(p.grad.abs().sum().item() for p in adapter.block_parameters(b)) for b in range(layers)]
        assert moments.collect([True] * layers)[1] == pytest.approx(direct, rel=1e-6)
        return len(block_of), counted

    (small, few), (large, many) = costs(2), costs(6)
    assert (many["hook"] - few["hook"]) / (large - small) == 1, (few, many)
    assert (many["adam"] - few["adam"]) / (large - small) == 2, (few, many)
    assert few["hook"] <= small + 10 and few["adam"] <= 2 * small + 24, few


def test_fused_chunk_sums_equal_the_per_chunk_ones(monkeypatch):
    """On CUDA the per-chunk sums are one fused _foreach_norm over all chunks (bench/gpu_checks.py checks
    its precision there); run on CPU here (small tensors, where its float32 sums are exact enough), the
    fused path's values come out in the same order and form as the per-chunk path's."""
    import ds_autofreeze.statistics as statistics
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(n, generator=g) for n in (1, 300, 5000)]
    monkeypatch.setattr(statistics, "_CHUNK", 2048)  # the last tensor in three chunks
    for of in ("squares", "abs", "values"):
        src = [t.abs() if of == "values" else t for t in tensors]
        per_chunk = statistics._chunk_sums(src, of)
        monkeypatch.setattr(statistics, "_FUSED_DEVICES", ("cpu",))
        fused = statistics._chunk_sums(src, of)
        monkeypatch.setattr(statistics, "_FUSED_DEVICES", ("cuda",))
        assert len(per_chunk) == 5 and fused.dtype == torch.float64
        assert fused.tolist() == pytest.approx(per_chunk.tolist(), rel=1e-5), of
