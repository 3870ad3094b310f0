"""AutoFreeze attached to DeepSpeed engines on one rank: repartition correctness against a plain PyTorch loop."""

import os

import deepspeed
import pytest
import torch

import ds_autofreeze
from ds_autofreeze.config import ConfigError
from ds_autofreeze.repartition import _run_view

from conftest import ROOT, adam_reading, batches, clip_rescale, ds_config, tiny_bert

SCHEDULE = {"total_steps": 30, "decider": {"name": "schedule", "schedule": [
    {"fraction": 0.2, "num_frozen_blocks": 1}, {"fraction": 0.4, "num_frozen_blocks": 3}]}}  # steps 6 and 12


def make_engine(stage=0, autofreeze=SCHEDULE, seed=0, **kw):
    """A stock DeepSpeed engine (deepspeed.initialize) with AutoFreeze attached: (engine, af, model)."""
    model = tiny_bert(seed=seed)
    groups = [{"params": [p for n, p in model.named_parameters() if "bias" not in n]},
              {"params": [p for n, p in model.named_parameters() if "bias" in n], "weight_decay": 0.0}]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_config(stage, autofreeze, **kw))
    return engine, ds_autofreeze.attach(engine, autofreeze), model


def train(engine, af, data, on_step=None, seed=123):
    """Losses of a training loop over ``data``; the dropout stream from ``seed`` (None: as it is)."""
    losses = []
    if seed is not None:
        torch.manual_seed(seed)
    for i, batch in enumerate(data):
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        af.after_step()
        losses.append(loss.item())
        if on_step:
            on_step(i + 1)
    return losses


def reference_losses(model, data, freeze_at: dict[int, int], lr=1e-3, rescale_clipping=False,
                     decisions_every: int = 0):
    """Plain PyTorch: AdamW, global-norm clipping at 1.0, freeze (requires_grad off + eval) after the given
    steps; at each freeze the clipping threshold scales by sqrt(the staying parameters' share of the
    trainable ones' summed exp_avg_sq), as ``rescale_clipping`` does; with ``decisions_every``, of its
    change since the last multiple of it (``rescale_from`` "interval")."""
    from ds_autofreeze.model_adapter import ModelAdapter
    adapter = ModelAdapter(model)
    groups = [{"params": [p for n, p in model.named_parameters() if "bias" not in n]},
              {"params": [p for n, p in model.named_parameters() if "bias" in n], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=0.01)
    model.train()
    losses, clip, previous = [], 1.0, None
    torch.manual_seed(123)
    for step, batch in enumerate(data, 1):
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        trainable = [p for p in model.parameters() if p.requires_grad]
        if step in freeze_at:
            adapter.set_frozen(freeze_at[step])  # torch AdamW skips params whose grad stays None
            if rescale_clipping:
                clip *= clip_rescale(opt, trainable, previous)
        if decisions_every and (step in freeze_at or step % decisions_every == 0):
            previous = adam_reading(opt, trainable, step)  # freezing leaves the moments as they are
    return losses


@pytest.mark.parametrize("stage,rescale", [(0, False), (0, True), (1, True), (2, True), (3, True)])
def test_attach_loss_matches_plain_pytorch_reference(stage, rescale):
    engine, af, model = make_engine(stage, autofreeze={**SCHEDULE, "rescale_clipping": rescale})
    reference_model = tiny_bert(seed=0)
    data = batches(30)
    losses = train(engine, af, data)
    expected = reference_losses(reference_model, data, {6: 1, 12: 3}, rescale_clipping=rescale)
    assert [e["step"] for e in af.freeze_events] == [6, 12]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected), rtol=1e-5, atol=0)
    clips = [e["gradient_clipping"] for e in af.freeze_events]
    assert 0 < clips[1] < clips[0] < 1.0 if rescale else clips == [1.0, 1.0]
    # and freezing made a difference, so the comparison is not vacuous
    assert losses != train(*make_engine(stage, autofreeze=None)[:2], data)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_attach_frozen_parameters_stay_bit_identical(stage):
    engine, af, model = make_engine(stage, autofreeze={"total_steps": 30, "decider": {
        "name": "schedule", "schedule": [{"fraction": 0.1, "num_frozen_blocks": 2}]}})
    snapshots = {}

    def snap(step):
        if step == 4:
            snapshots.update({n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad})
    train(engine, af, batches(23), on_step=snap)  # 19 steps after the one following the freeze at step 3
    assert snapshots and any("embeddings" in n for n in snapshots) and any("layer.1." in n for n in snapshots)
    params = dict(model.named_parameters())
    assert all(v.numel() == getattr(params[n], "ds_numel", v.numel()) > 0 for n, v in snapshots.items())
    for name, before in snapshots.items():
        assert torch.equal(before, dict(model.named_parameters())[name]), name
    assert all("layer.2." not in n for n in snapshots)


def test_attach_zero3_freeze_gathers_no_trainable_parameter(monkeypatch):
    """ZeRO-3's constructor would all-gather every trainable parameter to hook it; the rebuild skips
    that (the hooks need no data: the reference-loss test above shows they still reduce). Only the
    newly frozen parameters are gathered, once, to be kept whole."""
    from deepspeed.runtime.zero.partition_parameters import Init
    engine, af, model = make_engine(3, autofreeze=None)
    train(engine, af, batches(2))
    gathered = []
    original = Init._all_gather
    monkeypatch.setattr(Init, "_all_gather", lambda self, params, *a, **k: (gathered.extend(params),
                                                                           original(self, params, *a, **k))[1])
    af.freeze(2)
    assert gathered and not any(p.requires_grad for p in gathered)
    monkeypatch.setattr(Init, "_all_gather", original)
    train(engine, af, batches(2, seed=3))  # and training goes on, gathering for the forward pass


def master_and_moment(af, param):
    """The fp32 master copy and Adam exp_avg the optimizer keeps for a model parameter (one rank)."""
    layout = af.repartitioner.layout
    (frag,) = [f for f in layout.fragments() if f.param is param]
    assert frag.numel == getattr(param, "ds_numel", param.numel())
    return frag.view(frag.tensor.data).clone(), frag.view(layout.inner.state[frag.tensor]["exp_avg"]).clone()


def optimizer_numel(af):
    """Elements of fp32 master weights and of exp_avg the optimizer holds on this rank."""
    layout = af.repartitioner.layout
    tensors = layout.tensors()
    return sum(t.numel() for t in tensors), sum(layout.inner.state[t]["exp_avg"].numel() for t in tensors)


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_attach_optimizer_holds_only_trainable_and_carries_state(stage, bf16):
    extra = {"bf16": {"enabled": True}} if bf16 else {}
    model = tiny_bert(seed=0)
    engine, *_ = deepspeed.initialize(model=model, config={**ds_config(stage), **extra})
    af = ds_autofreeze.attach(engine)  # no config: freezing by hand only
    train(engine, af, batches(5))
    head = model.classifier.weight
    before = master_and_moment(af, head)
    assert before[0].dtype == torch.float32 and before[1].abs().sum() > 0
    where = [data_holder(p).data_ptr() for p in model.parameters()]
    af.freeze(3)
    if stage > 0:  # one param group, re-flattened in place: no parameter (ZeRO-3: partition) moved
        assert [data_holder(p).data_ptr() for p in model.parameters()] == where
    numel = lambda p: getattr(p, "ds_numel", p.numel())  # noqa: E731 - ZeRO-3 holds partitions
    trainable = sum(numel(p) for p in model.parameters() if p.requires_grad)
    assert trainable < sum(numel(p) for p in model.parameters()) // 2
    # One rank: the optimizer holds masters and moments for exactly the trainable parameters
    # (ZeRO pads its flat partitions to an alignment).
    masters, moments = optimizer_numel(af)
    assert trainable <= masters == moments <= trainable + 64
    after = master_and_moment(af, head)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    # The rebuilt moments are filled by the carry where a parameter lives and zero elsewhere (padding).
    layout = af.repartitioner.layout
    for tensor in layout.tensors():
        padding = torch.ones(tensor.numel(), dtype=torch.bool)
        for f in layout.fragments():
            if f.tensor is tensor:
                padding[f.offset:f.offset + f.numel] = False
        assert not layout.inner.state[tensor]["exp_avg"].view(-1)[padding].any()
    train(engine, af, batches(3, seed=9))  # and the rebuilt optimizer keeps training
    assert not torch.equal(master_and_moment(af, head)[0], after[0])


def data_holder(p: torch.nn.Parameter) -> torch.Tensor:
    return getattr(p, "ds_tensor", p)  # ZeRO-3 keeps a parameter's data in its partition


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_freeze_keeps_no_stale_copy(stage, groups):
    """After a freeze every storage holding parameter data is in use: no old buffer kept alive by the
    frozen parameters with the staying ones' old copies in it, whether the rebuild re-flattened in
    place (one param group) or copied (ZeRO-3 with two groups, whose staying runs alternate)."""
    model = tiny_bert(seed=0)
    named = list(model.named_parameters())
    params = [p for _, p in named] if groups == 1 else [
        {"params": [p for n, p in named if "bias" not in n and "LayerNorm" not in n]},
        {"params": [p for n, p in named if "bias" in n or "LayerNorm" in n], "weight_decay": 0.0}]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=ds_config(stage))
    af = ds_autofreeze.attach(engine)
    train(engine, af, batches(2))
    af.freeze(3)
    held: dict[int, list[int]] = {}
    for p in model.parameters():
        t = data_holder(p)
        storage = t.untyped_storage()
        held.setdefault(storage.data_ptr(), [storage.nbytes(), 0])[1] += t.numel() * t.element_size()
    for nbytes, live in held.values():
        assert live >= 0.98 * nbytes  # ZeRO's alignment padding, no more
    train(engine, af, batches(2, seed=9))


def test_flat_buffer_view_only_where_the_run_lines_up():
    storage = torch.arange(1.0, 17.0)
    a, b, c = storage[4:7], storage[8:10], storage[10:12]  # a padded by one to b, then c
    flat = _run_view([a, b, c], [1, 0, 0], alignment=4)
    assert flat.data_ptr() == a.data_ptr() and flat.numel() == 8
    assert flat.tolist() == [5, 6, 7, 0, 9, 10, 11, 12]  # padding zero, as DeepSpeed's copy has it
    assert _run_view([b, a], [0, 0], alignment=4) is None  # out of order
    assert _run_view([a, c], [1, 0], alignment=4) is None  # a gap
    assert _run_view([storage[13:15]], [0], alignment=4) is None  # the padded end would pass the storage's
    assert _run_view([a.clone(), b], [1, 0], alignment=4) is None  # another storage


def test_attach_lr_schedule_continues_through_freeze():
    sched = {"type": "WarmupDecayLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": 1e-3, "warmup_num_steps": 5,
                                                 "total_num_steps": 30, "warmup_type": "linear"}}
    lrs = {}
    for name, af in (("frozen", SCHEDULE), ("plain", None)):
        engine, attached, _ = make_engine(1, autofreeze=af, scheduler=sched)
        seen = []
        train(engine, attached, batches(20), on_step=lambda s, e=engine, out=seen: out.append(e.get_lr()))
        lrs[name] = seen
    assert lrs["frozen"] == lrs["plain"]
    assert lrs["frozen"][4] != lrs["frozen"][15]


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_attach_gradnorm_statistics_leave_training_untouched(stage):
    """The statistics only read: the run equals the reference loop freezing at the steps it chose."""
    engine, af, model = make_engine(stage, autofreeze={"decider": {"name": "gradnorm", "interval_steps": 3}})
    data = batches(30)
    losses = train(engine, af, data)
    assert af.freeze_events
    expected = reference_losses(tiny_bert(seed=0), data, {e["step"]: e["frozen_blocks"] for e in af.freeze_events},
                                rescale_clipping=True)  # the default
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected), rtol=1e-5, atol=0)


@pytest.mark.parametrize("stage", [0, 2])
def test_attach_rescales_clipping_by_the_last_interval(stage):
    """rescale_from "interval": the staying share of the squared gradients since the previous decision,
    from the change of Adam's second moments (summed over ZeRO-2's partitions), as the reference
    computes it per element; the first decision has nothing to difference with and uses the run's."""
    def run(rescale_from):
        engine, af, _ = make_engine(stage, autofreeze={"decider": {"name": "gradnorm", "interval_steps": 3},
                                                       "rescale_from": rescale_from})
        return train(engine, af, data), af.freeze_events

    data = batches(30)
    losses, events = run("interval")
    assert len(events) >= 2 and events[0]["step"] > 3  # a freeze with an earlier decision to difference with
    expected = reference_losses(tiny_bert(seed=0), data, {e["step"]: e["frozen_blocks"] for e in events},
                                rescale_clipping=True, decisions_every=3)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected), rtol=1e-5, atol=0)
    run_losses, run_events = run("run")
    assert events[0]["step"] == run_events[0]["step"]  # the threshold moves at a freeze, not before
    assert events[0]["gradient_clipping"] != run_events[0]["gradient_clipping"] and run_losses != losses


def test_attach_gradnorm_freezes_with_gradient_accumulation():
    engine, af, model = make_engine(2, accum=2, autofreeze={"decider": {"name": "gradnorm", "interval_steps": 3}})
    data = batches(40)
    train(engine, af, data)
    assert engine.global_steps == 20
    assert af.freeze_events, "gradnorm should freeze something in 20 steps"
    assert all(e["step"] % 3 == 0 for e in af.freeze_events)
    assert af.num_frozen_blocks <= af.num_blocks - 1


# snr on the gradient moments: its interval sums are saved mid-interval too. (This tiny model's
# gradients alternate over the first steps, interval SNR below zero on both estimators, -0.18 at step
# 4; the moments' estimate turns positive at step 12, Adam's not within 24 steps, against v or the
# recent scale.) Logging every statistic, the log holds the recent gradient scale: carried over the
# freeze's optimizer rebuild, and saved and restored with the checkpoint. rescale_from "interval": the
# second moments at the last decision before the save are restored for the next freeze's difference.
@pytest.mark.parametrize("stage,decider,log_statistics,rescale_from,save_at", [
    (1, {"name": "gradnorm", "interval_steps": 4}, False, "run", 14),
    (1, {"name": "snr", "estimator": "moments", "interval_steps": 4, "z": 100.0, "arm": 0.01}, False, "run", 18),
    (0, {"name": "gradnorm", "interval_steps": 4}, False, "interval", 10),
    (2, {"name": "gradnorm", "interval_steps": 4}, True, "run", 14)])
def test_attach_checkpoint_resume_is_bit_identical(tmp_path, stage, decider, log_statistics, rescale_from, save_at):
    # ZeRO-0 keeps the rescaled clipping threshold only in AutoFreeze's own state (ZeRO-1/2 also in theirs).
    af_config = {"total_steps": 24, "decider": decider, "rescale_clipping": True, "log_statistics": log_statistics,
                 "rescale_from": rescale_from}
    data = batches(24)
    engine, af, model = make_engine(stage, autofreeze=af_config)
    saved = {}

    def save(step):
        if step == save_at:  # mid-interval, after at least one freeze
            engine.save_checkpoint(str(tmp_path), tag="mid")
            saved.update(frozen=af.num_frozen_blocks, rng=torch.get_rng_state())

    losses = train(engine, af, data, on_step=save)
    assert saved["frozen"] > 0
    final = {n: p.detach().clone() for n, p in model.named_parameters()}

    resumed, af2, model2 = make_engine(stage, autofreeze=af_config, seed=7)  # different init: everything from disk
    resumed.load_checkpoint(str(tmp_path), tag="mid")
    assert af2.num_frozen_blocks == saved["frozen"] and resumed.global_steps == save_at
    torch.set_rng_state(saved["rng"])
    assert train(resumed, af2, data[save_at:], seed=None) == losses[save_at:]
    def untimed(events):
        return [{k: v for k, v in e.items() if k != "repartition_seconds"} for e in events]
    assert untimed(af2.freeze_events) == untimed(af.freeze_events) and af2.decider.log == af.decider.log
    if rescale_from == "interval":
        assert af.freeze_events[-1]["step"] > save_at  # its threshold came from the restored moments
    if log_statistics:
        assert all(r["stats"]["grad_sq_recent"][-1] > 0 for r in af.decider.log)
    for name, p in model2.named_parameters():
        assert torch.equal(p, final[name]), name


def test_attach_says_why_nothing_froze():
    """Adam's estimate on this tiny model stays below the arming level for 24 steps (above): the snr
    rule freezes nothing, and the run says block 0 never showed a signal; once blocks are frozen
    (here by hand) there is nothing to explain."""
    engine, af, _ = make_engine(0, autofreeze={"total_steps": 24, "decider": {"name": "snr", "interval_steps": 4}})
    train(engine, af, batches(24))
    assert af.num_frozen_blocks == 0 and af.decider.max_frozen == 1
    assert af.none_frozen() == ("snr: no decision found block 0 safe to freeze: it never showed a measurable "
                                "signal (span x snr >= decider.arm = 1.0)")
    af.freeze(1)
    assert af.none_frozen() is None
    af.close()


@pytest.mark.parametrize("kind, options, state_key", [
    (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}, "momentum_buffer"),
    # The Trainer's own optimizer when the DeepSpeed JSON has no "optimizer" section; its defaults
    # hold a key (decoupled_weight_decay) that its __init__ does not take.
    (torch.optim.AdamW, {"lr": 1e-3, "weight_decay": 0.05}, "exp_avg_sq"),
])
def test_attach_client_optimizer_is_rebuilt_over_the_trainable_parameters(kind, options, state_key):
    model = tiny_bert()
    config = ds_config(0, SCHEDULE)
    del config["optimizer"]
    client = kind(model.parameters(), **options)
    engine, *_ = deepspeed.initialize(model=model, optimizer=client, config=config)
    af = ds_autofreeze.attach(engine, SCHEDULE)
    train(engine, af, batches(8))
    assert af.num_frozen_blocks == 1
    assert type(engine.optimizer) is kind and engine.optimizer is not client
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    held = {id(p) for g in engine.optimizer.param_groups for p in g["params"]}
    assert held == trainable and engine.optimizer.defaults == client.defaults
    assert all(state_key in engine.optimizer.state[p] for p in model.classifier.parameters())


def test_attach_refuses_adam_statistics_without_adam():
    """The default decider reads Adam's moments; under SGD it would never freeze, so attach refuses."""
    model = tiny_bert()
    config = ds_config(0, {})
    del config["optimizer"]
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), config=config)
    with pytest.raises(ConfigError, match=r"autofreeze\.decider\.estimator: 'adam' .*\(SGD\) keeps none"):
        ds_autofreeze.attach(engine, {"total_steps": 40})
    af = ds_autofreeze.attach(engine, {"total_steps": 40, "decider": {"name": "snr", "estimator": "moments"}})
    assert af.decider.needs == {"grad"}
    af.close()


def test_attach_forward_survives_a_pre_hook_that_raises(recwarn):
    """A pre-hook ahead of AutoFreeze's (a user's check) raises: AutoFreeze's always-called forward
    hook must not fail on the forward it never saw, and the next forward runs."""
    engine, af, model = make_engine(0, autofreeze={"enabled": False})
    af.freeze(1)

    def refuse(module, args, kwargs):
        raise RuntimeError("refused")

    handle = model.register_forward_pre_hook(refuse, with_kwargs=True, prepend=True)
    batch = batches(1)[0]
    with pytest.raises(RuntimeError, match="refused"):
        engine(**batch)
    handle.remove()
    assert not [w for w in recwarn if "always_call" in str(w.message)]
    assert torch.isfinite(engine(**batch).loss)


def test_attach_freeze_validates():
    engine, af, _ = make_engine(0, autofreeze={"enabled": False})
    assert af.decider is None and af.num_frozen_blocks == 0
    with pytest.raises(ValueError, match="leave a block trainable"):
        af.freeze(4)
    af.freeze(2)
    with pytest.raises(ValueError, match="must grow"):
        af.freeze(1)


def test_attach_close_gives_the_engine_back():
    model = tiny_bert()
    engine, *_ = deepspeed.initialize(model=model, config=ds_config(0, SCHEDULE))
    hooks = (dict(model._forward_pre_hooks), dict(model._forward_hooks))
    with ds_autofreeze.attach(engine, SCHEDULE) as af:
        assert len(model._forward_pre_hooks) == len(hooks[0]) + 1
        assert engine.save_checkpoint == af.save_checkpoint
    assert engine.save_checkpoint.__func__ is deepspeed.runtime.engine.DeepSpeedEngine.save_checkpoint
    assert (dict(model._forward_pre_hooks), dict(model._forward_hooks)) == hooks
    assert af.controller.moments is None


# ---------------------------------------------------------------- refusals at attach, never at the first freeze

def test_attach_refuses_when_a_private_deepspeed_name_is_missing(monkeypatch):
    engine, *_ = deepspeed.initialize(model=tiny_bert(), config=ds_config(1))
    monkeypatch.delattr(deepspeed.runtime.engine.DeepSpeedEngine, "_configure_optimizer")
    with pytest.raises(ConfigError, match=r"DeepSpeedEngine\._configure_optimizer is missing"):
        ds_autofreeze.attach(engine, SCHEDULE)


def test_attach_refuses_a_missing_optimizer_internal(monkeypatch):
    engine, *_ = deepspeed.initialize(model=tiny_bert(), config=ds_config(2))
    monkeypatch.delattr(type(engine.optimizer), "_lazy_init_hp_params_optimizer_state")
    with pytest.raises(ConfigError, match=r"DeepSpeedZeroOptimizer\._lazy_init_hp_params_optimizer_state is missing"):
        ds_autofreeze.attach(engine, SCHEDULE)


def test_attach_refuses_an_older_deepspeed(monkeypatch):
    from ds_autofreeze.repartition import MIN_DEEPSPEED
    engine, *_ = deepspeed.initialize(model=tiny_bert(), config=ds_config(0))
    monkeypatch.setattr(deepspeed, "__version__", "0.18.2")
    with pytest.raises(ConfigError, match=f"older than {MIN_DEEPSPEED}"):
        ds_autofreeze.attach(engine)


def test_attach_refuses_optimizer_offload():
    config = ds_config(2)
    config["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    config["zero_force_ds_cpu_optimizer"] = False  # torch's AdamW: no JIT-built CPU Adam in tests
    engine, *_ = deepspeed.initialize(model=tiny_bert(), config=config)
    with pytest.raises(ConfigError, match="ZeRO offload"):
        ds_autofreeze.attach(engine, SCHEDULE)


def test_attach_refuses_an_engine_without_optimizer():
    config = ds_config(0)
    del config["optimizer"]
    engine, *_ = deepspeed.initialize(model=tiny_bert(), config=config)
    with pytest.raises(ConfigError, match="no optimizer"):
        ds_autofreeze.attach(engine)


def test_attach_refuses_fp16_with_zero0():
    """DeepSpeed's fused fp16 optimizer (ZeRO-0, FusedAdam) keeps one replicated flat master per group;
    its layout is not carried, so it is refused by what it holds (fp16 cannot be built on this CPU:
    the real engine is checked on a GPU by bench/gpu_checks.py)."""
    from ds_autofreeze.repartition import OptimizerLayout

    class FP16_Optimizer:  # noqa: N801 - what DeepSpeed's holds, by name
        def __init__(self):
            self.fp32_groups_flat, self.fp16_groups, self.optimizer = [], [], None
    with pytest.raises(ConfigError, match=r"fp16 with ZeRO-0 \(FP16_Optimizer.*use bf16, or zero_optimization.stage >= 1"):
        OptimizerLayout(FP16_Optimizer())


def test_pyproject_declares_the_minimum_deepspeed_attach_checks():
    import re
    from ds_autofreeze.repartition import MIN_DEEPSPEED
    from packaging.version import Version
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        (spec,) = re.findall(r'"deepspeed([^"]*)"', f.read())
    assert re.search(r">=\s*([\d.]+)", spec).group(1) == MIN_DEEPSPEED
    assert Version(deepspeed.__version__.split("+")[0]) >= Version(MIN_DEEPSPEED)


# ---------------------------------------------------------------- LoRA (PEFT)

def lora_run(cache_dir=None, steps: int = 16):
    """A LoRA-wrapped tiny BERT (adapters on every linear layer, the head trains), 2 blocks frozen
    at step 4 with their adapters, the cache serving them if ``cache_dir``."""
    from peft import LoraConfig, get_peft_model
    from ds_autofreeze.cache import ActivationCache
    from ds_autofreeze.config import CacheConfig
    model = get_peft_model(tiny_bert(seed=0), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear",
                                                         task_type="SEQ_CLS"))
    schedule = {"total_steps": steps, "decider": {"name": "schedule", "schedule": [
        {"fraction": 4 / steps, "num_frozen_blocks": 2}]}}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                      config=ds_config(1, schedule))
    af = ds_autofreeze.attach(engine, schedule)
    if cache_dir is not None:
        af.attach_cache(ActivationCache(CacheConfig(enabled=True), str(cache_dir), 32, "d"))
    data = batches(8)
    names = {id(p): n for n, p in model.named_parameters()}
    torch.manual_seed(123)
    losses, at_freeze = [], {}
    for step in range(steps):
        b = step % 8
        loss = engine(**data[b], example_ids=torch.arange(4 * b, 4 * b + 4)).loss
        engine.backward(loss)
        engine.step()
        af.after_step()
        losses.append(loss.item())
        if step + 1 == 4:
            at_freeze = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    held = {names[id(f.param)] for f in af.repartitioner.layout.fragments()}
    final = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    af.close()
    return losses, at_freeze, final, held


def test_lora_adapters_of_frozen_blocks_freeze_with_them_and_the_cache_stays_exact(tmp_path):
    losses, at_freeze, final, held = lora_run()
    frozen = [n for n in final if ".layer.0." in n or ".layer.1." in n]
    training = [n for n in final if ".layer.2." in n or ".layer.3." in n]
    assert frozen and training
    assert all(torch.equal(final[n], at_freeze[n]) for n in frozen)  # not one bit moved after the freeze
    assert any(not torch.equal(final[n], at_freeze[n]) for n in training if "lora_B" in n)
    # The optimizer holds the adapters of the trainable blocks and the head, nothing of the frozen ones.
    assert not held & set(frozen) and set(training) <= held and any("classifier" in n for n in held)
    assert all("lora_" in n or "classifier" in n for n in held)
    cached_losses, _, cached_final, _ = lora_run(tmp_path / "c")
    assert cached_losses == losses  # the cache serves the frozen prefix with its adapters, exactly
    assert all(torch.equal(cached_final[n], final[n]) for n in final)
