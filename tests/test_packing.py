"""The packing planner's cost model and choices, on small made-up clusters."""
import pytest

from ds_autofreeze.config import ConfigError, get_autofreeze_config
from ds_autofreeze.packing import (Cluster, allreduce_seconds, calibrate, choose_plan, feasible_plans, memory_bytes,
                                   step_seconds, timeline_seconds, uniform_blocks)

GB = 1e9


def work(**kw):
    # 4 blocks of 1M params + 2M embeddings + 0.1M head; an example takes 40 ms fwd+bwd.
    args = dict(global_batch=64, num_blocks=4, block_params=10 ** 6, embedding_params=2 * 10 ** 6,
                head_params=10 ** 5, example_seconds=0.04, activation_bytes=50e6)
    return uniform_blocks(**{**args, **kw})


def cluster(**kw):
    args = dict(max_workers=8, workers_per_node=4, intra_node_bytes_per_second=10 * GB,
                inter_node_bytes_per_second=0.01 * GB, worker_memory_bytes=None)
    return Cluster(**{**args, **kw})


def test_allreduce_cost_is_zero_alone_and_pays_the_slow_link_across_nodes():
    c = cluster()
    assert allreduce_seconds(c, 1, 1e9) == 0
    assert allreduce_seconds(c, 4, 1e8) == pytest.approx(2 * 3 / 4 * 1e8 / (10 * GB))
    assert allreduce_seconds(c, 8, 1e8) == pytest.approx(2 * 7 / 8 * 1e8 / (0.01 * GB))


def test_freezing_removes_forward_backward_and_gradient_traffic():
    w, c = work(), cluster()
    full, half = step_seconds(w, c, 0, 8, 8, 1), step_seconds(w, c, 2, 8, 8, 1)
    assert half < full
    cached = step_seconds(work(cached_prefix=True), c, 2, 8, 8, 1)
    assert cached < half  # the cache also drops the frozen forward
    assert memory_bytes(w, 2, 8) < memory_bytes(w, 0, 8)


def test_plans_keep_the_global_batch_and_fit_memory():
    w = work()
    c = cluster(worker_memory_bytes=memory_bytes(w, 0, 4))  # 4 examples fit with nothing frozen
    plans = feasible_plans(w, c, 0)
    assert all(p.workers * p.micro_batch * p.accumulation == 64 for p in plans)
    assert all(p.micro_batch <= 4 for p in plans)
    assert {p.workers for p in plans} == {1, 2, 4, 8}
    # Frozen blocks keep no activations: bigger micro-batches fit, fewer accumulation steps.
    assert max(p.micro_batch for p in feasible_plans(w, c, 3)) > 4
    with pytest.raises(ValueError, match="no plan fits"):
        choose_plan("performance", w, cluster(worker_memory_bytes=1), 0, 10, 8)


def test_performance_packs_onto_one_node_once_freezing_frees_memory():
    # Each micro-batch costs 0.5 s of fixed overhead and, with nothing frozen, only 4 examples
    # fit: one node (4 workers) would need 4 micro-steps, so 8 workers across the slow link win.
    # Three frozen blocks keep no activations: 16 examples fit, one micro-step, and the single
    # node beats paying the inter-node all-reduce.
    w = work()
    c = cluster(inter_node_bytes_per_second=36e6, micro_step_seconds=0.5, worker_memory_bytes=memory_bytes(w, 0, 4))
    before = choose_plan("performance", w, c, 0, 100, 8)
    assert (before.workers, before.micro_batch, before.accumulation) == (8, 4, 2)
    after = choose_plan("performance", w, c, 3, 100, 8)
    assert (after.workers, after.micro_batch, after.accumulation) == (4, 16, 1)
    assert after.remaining_seconds < 100 * step_seconds(w, c, 3, 8, 8, 1)


def test_performance_stays_wide_on_a_fast_network_and_packs_on_a_slow_one():
    w = work()
    assert choose_plan("performance", w, cluster(inter_node_bytes_per_second=10 * GB), 3, 100, 8).workers == 8
    assert choose_plan("performance", w, cluster(inter_node_bytes_per_second=0.01 * GB), 0, 100, 8).workers == 4


def test_efficiency_minimises_cost_within_the_deadline():
    w, c = work(), cluster()
    cheapest = choose_plan("efficiency", w, c, 3, 100, 8)
    assert cheapest.workers == 1  # no communication at all, same compute per example
    fastest = choose_plan("performance", w, c, 3, 100, 8)
    tight = choose_plan("efficiency", w, c, 3, 100, 8, seconds_left=fastest.remaining_seconds * 1.01)
    assert tight.workers == fastest.workers
    # A deadline nobody can meet: the fastest plan.
    assert choose_plan("efficiency", w, c, 3, 100, 8, seconds_left=1e-6).workers == fastest.workers


def test_a_move_must_pay_for_its_restart():
    w = work()
    assert choose_plan("efficiency", w, cluster(), 3, 100, 8).workers == 1
    assert choose_plan("efficiency", w, cluster(restart_seconds=1e6), 3, 100, 8).workers == 8


def test_calibration_reproduces_the_measured_step():
    w, c = work(), cluster()
    fitted = calibrate(w, c, 1, 4, 8, 2, measured_step_seconds=3.0)
    assert step_seconds(fitted, c, 1, 4, 8, 2) == pytest.approx(3.0)
    # Other boundaries scale by the modelled work, not by the measurement alone.
    assert step_seconds(fitted, c, 3, 4, 8, 2) < 3.0


def test_timeline_replay_orders_no_freezing_freezing_and_packing():
    w, c = work(), cluster()
    freezes = [(20, 1), (30, 2), (40, 3)]
    base = timeline_seconds("performance", w, c, [], 100, 8, pack=False)
    frozen = timeline_seconds("performance", w, c, freezes, 100, 8, pack=False)
    perf = timeline_seconds("performance", w, c, freezes, 100, 8)
    eff = timeline_seconds("efficiency", w, c, freezes, 100, 8)
    assert perf["seconds"] < frozen["seconds"] < base["seconds"]
    assert eff["cost"] < frozen["cost"] and eff["cost"] <= perf["cost"]
    assert [s["from_step"] for s in perf["segments"]] == [0, 20, 30, 40]


def test_packing_config_is_validated():
    config = get_autofreeze_config({"autofreeze": {"packing": {"mode": "efficiency", "deadline_seconds": 3600}}})
    assert config.packing.mode.value == "efficiency" and config.packing.deadline_seconds == 3600
    with pytest.raises(ConfigError, match="autofreeze.packing.mode"):
        get_autofreeze_config({"autofreeze": {"packing": {"mode": "fastest"}}})
    with pytest.raises(ConfigError, match="autofreeze.packing.worker_price_per_hour"):
        get_autofreeze_config({"autofreeze": {"packing": {"worker_price_per_hour": 0}}})


def test_forward_profile_times_every_block_and_leaves_the_rng_alone():
    import torch
    from ds_autofreeze.model_adapter import ModelAdapter
    from ds_autofreeze.packing import profile_forward, workload_of
    from conftest import batches, tiny_bert
    model = tiny_bert(num_layers=3)
    adapter = ModelAdapter(model)
    batch = {k: v for k, v in batches(1)[0].items() if k != "labels"}
    state = torch.get_rng_state()
    per_block, rest = profile_forward(model.train(), adapter, batch)
    assert torch.equal(torch.get_rng_state(), state)
    assert len(per_block) == 3 and all(t > 0 for t in per_block) and rest >= 0
    work = workload_of(model, adapter, 16, 12, cached_prefix=False, profile_batch=batch)
    assert work.num_blocks == 3 and all(t > 0 for t in work.block_forward_seconds)
    assert work.block_params[0] > work.block_params[1]  # block 0 carries the embeddings
