"""AutoFreezeEngine on one rank: repartition correctness against a plain PyTorch loop."""

import pytest
import torch

import ds_autofreeze
from ds_autofreeze.config import ConfigError

from conftest import batches, ds_config, tiny_bert

SCHEDULE = {"total_steps": 30, "decider": {"name": "schedule", "schedule": [
    {"fraction": 0.2, "num_frozen_blocks": 1}, {"fraction": 0.4, "num_frozen_blocks": 3}]}}  # steps 6 and 12


def make_engine(stage=0, autofreeze=SCHEDULE, seed=0, **kw):
    model = tiny_bert(seed=seed)
    groups = [{"params": [p for n, p in model.named_parameters() if "bias" not in n]},
              {"params": [p for n, p in model.named_parameters() if "bias" in n], "weight_decay": 0.0}]
    engine, *_ = ds_autofreeze.initialize(model=model, model_parameters=groups, config=ds_config(stage, autofreeze, **kw))
    return engine, model, groups


def train(engine, data, on_step=None):
    losses = []
    torch.manual_seed(123)  # dropout stream
    for i, batch in enumerate(data):
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
        if on_step:
            on_step(i + 1)
    return losses


def reference_losses(model, data, freeze_at: dict[int, int], lr=1e-3):
    """Plain PyTorch: AdamW, global-norm clipping at 1.0, freeze (requires_grad off + eval) after the given steps."""
    from ds_autofreeze.model_adapter import ModelAdapter
    adapter = ModelAdapter(model)
    groups = [{"params": [p for n, p in model.named_parameters() if "bias" not in n]},
              {"params": [p for n, p in model.named_parameters() if "bias" in n], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=0.01)
    model.train()
    losses = []
    torch.manual_seed(123)
    for step, batch in enumerate(data, 1):
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step in freeze_at:
            adapter.set_frozen(freeze_at[step])  # torch AdamW skips params whose grad stays None
    return losses


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_engine_loss_matches_plain_pytorch_reference(stage):
    engine, model, _ = make_engine(stage)
    reference_model = tiny_bert(seed=0)
    data = batches(30)
    losses = train(engine, data)
    expected = reference_losses(reference_model, data, {6: 1, 12: 3})
    assert [e["step"] for e in engine.freeze_events] == [6, 12]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected), rtol=1e-5, atol=0)
    # and freezing made a difference, so the comparison is not vacuous
    assert losses != train(make_engine(stage, autofreeze=None)[0], data)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_engine_frozen_parameters_stay_bit_identical(stage):
    engine, model, _ = make_engine(stage, autofreeze={"total_steps": 30, "decider": {
        "name": "schedule", "schedule": [{"fraction": 0.1, "num_frozen_blocks": 2}]}})
    snapshots = {}

    def snap(step):
        if step == 4:  # ZeRO-3 gathers a frozen parameter at its first use after the freeze, then keeps it
            snapshots.update({n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad})
    train(engine, batches(23), on_step=snap)  # 19 steps after the one following the freeze at step 3
    assert snapshots and any("embeddings" in n for n in snapshots) and any("layer.1." in n for n in snapshots)
    params = dict(model.named_parameters())
    assert all(v.numel() == getattr(params[n], "ds_numel", v.numel()) > 0 for n, v in snapshots.items())
    for name, before in snapshots.items():
        assert torch.equal(before, dict(model.named_parameters())[name]), name
    assert all("layer.2." not in n for n in snapshots)


def master_and_moment(engine, param):
    """The fp32 master copy and Adam exp_avg the optimizer keeps for a model parameter."""
    if getattr(param, "_hp_mapping", None) is not None or hasattr(param, "ds_id"):  # ZeRO-1/2/3 flat partitions
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
        return safe_get_full_fp32_param(param), safe_get_full_optimizer_state(param, "exp_avg")
    inner, pairs = engine._master_pairs()
    master = next(m for p, m in pairs if p is param)
    return master.detach().clone(), inner.state[master]["exp_avg"].clone()


def optimizer_numel(engine):
    """Elements of fp32 master weights and of exp_avg the optimizer holds on this rank."""
    from ds_autofreeze.engine import _flat_partitions
    flats = _flat_partitions(engine.optimizer)
    inner = engine.optimizer.optimizer if flats is not None else engine._master_pairs()[0]
    masters = flats if flats is not None else [m for _, m in engine._master_pairs()[1]]
    return sum(m.numel() for m in masters), sum(st["exp_avg"].numel() for st in inner.state.values())


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_engine_optimizer_holds_only_trainable_and_carries_state(stage, bf16):
    extra = {"bf16": {"enabled": True}} if bf16 else {}
    model = tiny_bert(seed=0)
    engine, *_ = ds_autofreeze.initialize(model=model, config={**ds_config(stage, {"enabled": False}), **extra})
    train(engine, batches(5))
    head = model.classifier.weight
    before = master_and_moment(engine, head)
    assert before[0].dtype == torch.float32 and before[1].abs().sum() > 0
    engine.freeze_and_repartition(3)
    numel = lambda p: getattr(p, "ds_numel", p.numel())  # noqa: E731 - ZeRO-3 holds partitions
    trainable = sum(numel(p) for p in model.parameters() if p.requires_grad)
    assert trainable < sum(numel(p) for p in model.parameters()) // 2
    # One rank: the optimizer holds masters and moments for exactly the trainable parameters.
    assert optimizer_numel(engine) == (trainable, trainable)
    after = master_and_moment(engine, head)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    train(engine, batches(3, seed=9))  # and the rebuilt optimizer keeps training
    assert not torch.equal(master_and_moment(engine, head)[0], after[0])


def test_engine_lr_schedule_continues_through_freeze():
    sched = {"type": "WarmupDecayLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": 1e-3, "warmup_num_steps": 5,
                                                 "total_num_steps": 30, "warmup_type": "linear"}}
    lrs = {}
    for name, af in (("frozen", SCHEDULE), ("plain", None)):
        engine, *_ = make_engine(1, autofreeze=af, scheduler=sched)
        seen = []
        train(engine, batches(20), on_step=lambda s, e=engine, out=seen: out.append(e.get_lr()))
        lrs[name] = seen
    assert lrs["frozen"] == lrs["plain"]
    assert lrs["frozen"][4] != lrs["frozen"][15]


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_engine_gradnorm_statistics_leave_training_untouched(stage):
    """The gradient hooks only read: the run equals the reference loop freezing at the steps it chose."""
    engine, model, _ = make_engine(stage, autofreeze={"decider": {"name": "gradnorm", "interval_steps": 3}})
    data = batches(30)
    losses = train(engine, data)
    assert engine.freeze_events
    expected = reference_losses(tiny_bert(seed=0), data, {e["step"]: e["frozen_blocks"] for e in engine.freeze_events})
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected), rtol=1e-5, atol=0)


def test_engine_gradnorm_freezes_with_gradient_accumulation():
    engine, model, _ = make_engine(2, accum=2, autofreeze={"decider": {"name": "gradnorm", "interval_steps": 3}})
    data = batches(40)
    train(engine, data)
    assert engine.global_steps == 20
    assert engine.freeze_events, "gradnorm should freeze something in 20 steps"
    assert all(e["step"] % 3 == 0 for e in engine.freeze_events)
    assert engine.num_frozen_blocks <= engine.num_blocks - 1


def test_engine_checkpoint_resume_is_bit_identical(tmp_path):
    af = {"decider": {"name": "gradnorm", "interval_steps": 4}}
    data = batches(24)
    engine, model, _ = make_engine(1, autofreeze=af)
    torch.manual_seed(123)
    losses = []
    for i, batch in enumerate(data):
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
        if i + 1 == 14:  # mid-interval, after at least one freeze
            frozen_at_save = engine.num_frozen_blocks
            engine.save_checkpoint(str(tmp_path), tag="mid")
            rng = torch.get_rng_state()
    assert frozen_at_save > 0
    final = {n: p.detach().clone() for n, p in model.named_parameters()}

    resumed, model2, _ = make_engine(1, autofreeze=af, seed=7)  # different init: everything must come from disk
    resumed.load_checkpoint(str(tmp_path), tag="mid")
    assert resumed.num_frozen_blocks == frozen_at_save and resumed.global_steps == 14
    torch.set_rng_state(rng)
    resumed_losses = []
    for batch in data[14:]:
        loss = resumed(**batch).loss
        resumed.backward(loss)
        resumed.step()
        resumed_losses.append(loss.item())
    assert resumed_losses == losses[14:]
    assert resumed.freeze_events == engine.freeze_events
    for name, p in model2.named_parameters():
        assert torch.equal(p, final[name]), name


def test_engine_rejects_client_optimizer():
    model = tiny_bert()
    with pytest.raises(ConfigError, match="optimizer"):
        ds_autofreeze.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                 config=ds_config(0, SCHEDULE))


def test_engine_freeze_and_repartition_validates():
    engine, *_ = make_engine(0, autofreeze={"enabled": False})
    assert engine.decider is None and engine.num_frozen_blocks == 0
    with pytest.raises(ValueError, match="leave a block trainable"):
        engine.freeze_and_repartition(4)
    engine.freeze_and_repartition(2)
    with pytest.raises(ValueError, match="must grow"):
        engine.freeze_and_repartition(1)
