import math

import pytest

from ds_autofreeze.config import ConfigError, GradNormConfig, ScheduleConfig, SNRConfig, StaticConfig
from ds_autofreeze.deciders import DECIDERS, GradNormDecider, build_decider
from ds_autofreeze.statistics import BlockStats


def l1(step, norms):
    """An interval's statistics as gradnorm reads them: the L1 norm of each block's summed gradient."""
    return BlockStats(step=step, steps=10, grad_l1=list(norms), grad_sum_sq=[None] * len(norms),
                      grad_sq_sum=[None] * len(norms))


def gradnorm(num_blocks=6, interval=10, percentile=50.0, min_trainable=1):
    return build_decider(GradNormConfig(interval_steps=interval, percentile=percentile, min_trainable=min_trainable),
                         num_blocks, None)


def test_deciders_registry_is_closed():
    assert set(DECIDERS) == {"gradnorm", "snr", "drift", "static", "schedule"}


def test_gradnorm_decides_only_at_interval_ends():
    d = gradnorm(interval=10)
    assert [s for s in range(1, 31) if d.is_decision_step(s)] == [10, 20, 30]
    assert d.decide(7, 0, None) == 0  # not a decision step: no stats needed, no change


def test_gradnorm_interval_from_num_intervals():
    d = build_decider(GradNormConfig(num_intervals=10), 6, 375)
    assert d.interval == 37


def test_gradnorm_needs_total_steps_without_interval():
    with pytest.raises(ConfigError, match="total_steps"):
        build_decider(GradNormConfig(), 6, None)


def test_gradnorm_first_decision_only_records():
    d = gradnorm()
    assert d.decide(10, 0, l1(10, [1, 1, 1, 1, 1, 1])) == 0
    assert d.prev_norms == [1, 1, 1, 1, 1, 1]


def test_gradnorm_freezes_prefix_before_first_block_at_threshold():
    d = gradnorm()
    d.decide(10, 0, l1(10, [10.0] * 6))
    # ratios: 0.01 0.02 0.5 0.03 0.6 0.7 -> median 0.265; first block >= it is block 2
    cur = [9.9, 9.8, 5.0, 9.7, 4.0, 3.0]
    assert d.decide(20, 0, l1(20, cur)) == 2


def test_gradnorm_percentile_moves_threshold():
    prev, cur = [10.0] * 6, [9.9, 9.8, 9.7, 9.6, 5.0, 4.0]  # ratios .01 .02 .03 .04 .5 .6
    low, high = gradnorm(percentile=10), gradnorm(percentile=90)
    for d in (low, high):
        d.decide(10, 0, l1(10, prev))
    assert low.decide(20, 0, l1(20, cur)) == 1  # threshold 0.015: block 1 reaches it
    assert high.decide(20, 0, l1(20, cur)) == 5  # threshold 0.55: block 5 is the first to reach it, capped by min_trainable


def test_gradnorm_threshold_uses_only_trainable_blocks():
    d = gradnorm()
    d.decide(10, 2, l1(10, [10.0] * 6))
    # blocks 0,1 frozen (their huge ratios must not raise the threshold); trainable ratios .1 .01 .02 .5
    cur = [0.0, 0.0, 9.0, 9.9, 9.8, 5.0]
    # median of (.1, .01, .02, .5) = .06 -> block 2 (.1) reaches it: no change
    assert d.decide(20, 2, l1(20, cur)) == 2


def test_gradnorm_never_unfreezes():
    d = gradnorm()
    d.decide(10, 3, l1(10, [10.0] * 6))
    # Every trainable block changes a lot; the first one reaching the threshold is block 3 itself.
    assert d.decide(20, 3, l1(20, [10, 10, 10, 1.0, 9.0, 9.5])) == 3
    assert d.clamp(4, 2) == 4


def test_gradnorm_respects_min_trainable():
    cur = [9.9, 9.8, 9.7, 9.6, 9.5, 1.0]  # ratios .01 .02 .03 .04 .05 .9; 90th percentile .475 -> block 5
    d2 = gradnorm(num_blocks=6, percentile=90, min_trainable=2)
    d1 = gradnorm(num_blocks=6, percentile=90, min_trainable=1)
    for d in (d1, d2):
        d.decide(10, 0, l1(10, [10.0] * 6))
    assert d1.decide(20, 0, l1(20, cur)) == 5
    assert d2.decide(20, 0, l1(20, cur)) == 4  # the last 2 blocks stay trainable
    third = gradnorm(num_blocks=6, percentile=90, min_trainable=0.34)  # a third of 6 blocks: 2
    third.decide(10, 0, l1(10, [10.0] * 6))
    assert third.decide(20, 0, l1(20, cur)) == 4


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_gradnorm_nonfinite_statistics_never_freeze(bad):
    d = gradnorm()
    d.decide(10, 0, l1(10, [10.0] * 6))
    assert d.decide(20, 0, l1(20, [9.9, 9.9, bad, 5.0, 4.0, 3.0])) == 0
    assert d.prev_norms == [10.0] * 6  # the broken interval is not the new reference
    assert d.decide(30, 0, l1(30, [9.9, 9.8, 5.0, 9.7, 4.0, 3.0])) == 2  # compared against the last good one


def test_gradnorm_nonfinite_first_interval_is_not_recorded():
    d = gradnorm()
    assert d.decide(10, 0, l1(10, [math.nan] * 6)) == 0
    assert d.prev_norms is None


def test_gradnorm_zero_previous_norm_counts_as_changing():
    d = gradnorm()
    d.decide(10, 0, l1(10, [0.0, 10, 10, 10, 10, 10]))
    assert d.decide(20, 0, l1(20, [0.0, 9.9, 9.9, 9.9, 9.9, 9.9])) == 0


def test_gradnorm_state_round_trip():
    d = gradnorm()
    d.decide(10, 0, l1(10, [1, 2, 3, 4, 5, 6]))
    e = gradnorm()
    e.load_state_dict(d.state_dict())
    cur = [0.9, 2, 1, 4, 5, 6]
    assert e.decide(20, 0, l1(20, cur)) == d.decide(20, 0, l1(20, cur))


def test_static_freezes_from_step_zero_and_validates():
    d = build_decider(StaticConfig(num_frozen_blocks=3), 6, None)
    assert d.decide(0, 0) == 3 and d.decide(100, 3) == 3
    with pytest.raises(ConfigError, match="min_trainable"):
        build_decider(StaticConfig(num_frozen_blocks=6), 6, None)
    with pytest.raises(ConfigError, match=r"min_trainable=0\.5 \(6 of 12\) blocks"):
        build_decider(StaticConfig(num_frozen_blocks=7, min_trainable=0.5), 12, None)


def test_schedule_follows_fractions():
    cfg = ScheduleConfig(schedule=[{"fraction": 0.25, "num_frozen_blocks": 2}, {"fraction": 0.5, "num_frozen_blocks": 4}])
    d = build_decider(cfg, 6, 100)
    got = {}
    boundary = 0
    for step in range(0, 101):
        new = d.decide(step, boundary)
        if new != boundary:
            got[step] = new
        boundary = new
    assert got == {25: 2, 50: 4}


def test_schedule_rejects_freezing_everything():
    cfg = ScheduleConfig(schedule=[{"fraction": 0.5, "num_frozen_blocks": 6}])
    with pytest.raises(ConfigError, match="min_trainable"):
        build_decider(cfg, 6, 100)
    with pytest.raises(ConfigError, match="total_steps"):
        build_decider(ScheduleConfig(schedule=[{"fraction": 0.5, "num_frozen_blocks": 2}]), 6, None)


def test_gradnorm_decider_type():
    assert isinstance(gradnorm(), GradNormDecider)


def test_gradnorm_logs_every_decision_and_resumes_with_it():
    d = gradnorm()
    d.decide(10, 0, l1(10, [10.0] * 6))
    d.decide(20, 0, l1(20, [9.9, 9.8, 5.0, 9.7, 4.0, 3.0]))
    assert [r["step"] for r in d.log] == [10, 20] and "ratios" not in d.log[0]
    assert d.log[1]["ratios"][:3] == [0.01, 0.02, 0.5] and d.log[1]["boundary"] == 2
    d.decide(30, 2, l1(30, [9.0] * 6))
    assert d.log[2]["ratios"][:2] == [None, None]  # frozen blocks have no ratio
    resumed = gradnorm()
    resumed.load_state_dict(d.state_dict())
    assert resumed.log == d.log and resumed.prev_norms == d.prev_norms


def test_gradnorm_max_ratio_keeps_blocks_that_still_change_a_lot():
    prev, cur = [10.0] * 6, [7.0, 6.5, 5.0, 4.0, 3.0, 2.0]  # ratios .3 .35 .5 .6 .7 .8: all still moving
    paper, guarded = gradnorm(), build_decider(GradNormConfig(interval_steps=10, max_ratio=0.1), 6, None)
    for d in (paper, guarded):
        d.decide(10, 0, l1(10, prev))
    assert paper.decide(20, 0, l1(20, cur)) == 3  # the slower half freezes: relative ranking only
    assert guarded.decide(20, 0, l1(20, cur)) == 0
    assert guarded.decide(30, 0, l1(30, [6.9, 6.4, 6.0, 5.0, 3.5, 2.5])) == 2  # blocks 0, 1 moved < 10% and below the median


def test_gradnorm_patience_needs_consecutive_qualifying_decisions():
    d = build_decider(GradNormConfig(interval_steps=10, patience=2), 6, None)
    d.decide(10, 0, l1(10, [10.0] * 6))
    assert d.decide(20, 0, l1(20, [9.9, 9.9, 5.0, 5.0, 5.0, 5.0])) == 0  # blocks 0, 1 qualify once
    assert d.decide(30, 0, l1(30, [9.8, 2.0, 2.0, 2.0, 2.0, 2.0])) == 1  # block 0 twice: frozen; block 1's streak broken
    assert d.decide(40, 1, l1(40, [9.7, 1.98, 1.0, 1.0, 1.0, 1.0])) == 1  # block 1 qualifies once again
    assert d.decide(50, 1, l1(50, [9.6, 1.97, 0.5, 0.5, 0.5, 0.5])) == 2  # and twice
    resumed = build_decider(GradNormConfig(interval_steps=10, patience=2), 6, None)
    resumed.load_state_dict(d.state_dict())
    assert resumed.streak == d.streak


def adam_read(step, ratio, num_blocks=2, lr_left=50):
    """Adam's moments as the snr decider reads them: sum m^2 / sum v = ``ratio`` in every block."""
    return BlockStats(step=step, steps=1, adam_m2=[ratio] * num_blocks, adam_v=[1.0] * num_blocks,
                      adam_beta1=0.9, adam_step=step, future_lr_sum=float(lr_left), future_lr_sq_sum=float(lr_left))


def test_snr_arms_on_a_warmup_step_between_decisions():
    """The signal shows at step 5 only, between decisions (every 8 steps, warmup 10): the warmup's
    reads arm the blocks, which then freeze once done; reads stop at the warmup's end. Read at the
    decision steps alone, the same run is never armed and never freezes."""
    config = SNRConfig(interval_steps=8, min_trainable=1, window=1, confidence=0.0)
    strong, quiet = 0.5, 0.0  # 10 x snr at step 5: about 6; quiet is below the noise floor
    for warmup_reads in (True, False):
        decider = build_decider(config, 2, 80, warmup_steps=10)
        boundary = 0
        for step in range(1, 81):
            reads = decider.reads_between(step)
            assert reads == (frozenset({"adam"}) if 1 < step <= 10 and not all(decider.armed) else frozenset())
            if decider.is_decision_step(step):
                stats = adam_read(step, quiet)
            elif reads and warmup_reads:
                stats = adam_read(step, strong if step == 5 else quiet)
            else:
                stats = None
            boundary = decider.decide(step, boundary, stats)
        assert boundary == (1 if warmup_reads else 0), warmup_reads
        assert decider.armed == [warmup_reads] * 2


def test_snr_window_skips_estimates_that_remember_the_warmup():
    """A 62-step run (warmup 4, a decision every 3 steps) armed at step 2 and read "done" from then on
    froze at step 9, on Adam's ratio at steps 3, 6 and 9, whose averages are mostly the warmup's. Only
    estimates 1 / (1 - b1) = 10 steps past the warmup count: the window fills at steps 15, 18, 21."""
    decider = build_decider(SNRConfig(interval_steps=3, min_trainable=1), 2, 62, warmup_steps=4)
    boundary, frozen_at = 0, None
    for step in range(1, 63):
        stats = adam_read(step, 0.9 if step == 2 else 0.0, lr_left=62 - step) \
            if decider.is_decision_step(step) or decider.reads_between(step) else None
        boundary = decider.decide(step, boundary, stats)
        if boundary and frozen_at is None:
            frozen_at = step
    assert decider.armed_at == [2, 2] and frozen_at == 21
    assert [r["step"] for r in decider.log if r.get("settling")] == [3, 6, 9, 12]
    five = build_decider(SNRConfig(interval_steps=3, min_trainable=1), 2, 62, warmup_steps=5)
    five.decide(15, 0, adam_read(15, 0.0, lr_left=47))  # exactly 1 / (1 - b1) steps past the warmup
    assert "settling" not in five.log[-1]


def test_snr_keeps_the_step_each_block_armed_at_and_says_why_nothing_froze():
    config = SNRConfig(interval_steps=8, min_trainable=1, z=0.01)  # z: no block is ever done
    decider = build_decider(config, 3, 80, warmup_steps=10)
    decider.decide(3, 0, BlockStats(step=3, steps=1, adam_m2=[0.5, 0.0, 0.5], adam_v=[1.0] * 3, adam_beta1=0.9,
                                    adam_step=3, future_lr_sum=50.0, future_lr_sq_sum=50.0))
    assert decider.armed_at == [3, None, 3] and decider.armed == [True, False, True]
    assert decider.none_frozen() == "snr: the run ended before its first decision (every 8 steps)"
    for step in (5, 8):
        decider.decide(step, 0, adam_read(step, 0.5, num_blocks=3))
    assert decider.armed_at == [3, 5, 3]  # the first step a block armed at is kept
    assert decider.none_frozen() == "snr: no decision could freeze (inside the learning-rate warmup)"
    decider.decide(16, 0, adam_read(16, 0.5, num_blocks=3))  # 6 steps past the warmup: Adam's average still in it
    assert decider.none_frozen() == ("snr: no decision found block 0 safe to freeze (armed at step 3): the run ended "
                                     "before 3 decision(s) whose statistics start after the warmup (decider.window)")
    for step in (24, 32, 40):
        decider.decide(step, 0, adam_read(step, 0.5, num_blocks=3))
    assert decider.none_frozen() == ("snr: no decision found block 0 safe to freeze (armed at step 3): what the rest "
                                     "of the run could still add to it never stayed below the noise (z = 0.01) for "
                                     "1 consecutive decision(s)")
    resumed = build_decider(config, 3, 80, warmup_steps=10)
    resumed.load_state_dict(decider.state_dict())
    assert resumed.armed_at == [3, 5, 3]
    assert decider.state_dict()["armed"] == [True, True, True]  # the key code from before armed_at reads
    old = {k: v for k, v in decider.state_dict().items() if k != "armed_at"}
    resumed.load_state_dict({**old, "armed": [True, False, True]})  # a checkpoint from before armed_at
    assert resumed.armed == [True, False, True] and "(armed before its checkpoint)" in resumed.none_frozen()

    quiet = build_decider(config, 3, 80)  # block 0 never shows a signal; the others do
    quiet.decide(8, 0, BlockStats(step=8, steps=1, adam_m2=[0.0, 0.5, 0.5], adam_v=[1.0] * 3, adam_beta1=0.9,
                                  adam_step=8, future_lr_sum=50.0, future_lr_sq_sum=50.0))
    assert quiet.none_frozen() == ("snr: no decision found block 0 safe to freeze: it never showed a measurable "
                                   "signal (span x snr >= decider.arm = 1.0)")
    unscheduled = build_decider(config, 3, 80)
    unscheduled.decide(8, 0, adam_read(8, 0.5, num_blocks=3, lr_left=0))
    assert unscheduled.none_frozen() == "snr: no decision could freeze (no learning-rate schedule)"
    assert build_decider(SNRConfig(min_trainable=3), 3, 80).none_frozen() == \
        "snr: min_trainable=3 keeps every block trainable"


def test_snr_warmup_reads_stop_once_armed_and_only_for_adam():
    decider = build_decider(SNRConfig(interval_steps=8), 2, 80, warmup_steps=10)
    decider.decide(3, 0, adam_read(3, 0.5))
    assert decider.armed == [True, True] and decider.reads_between(4) == frozenset()
    moments = build_decider(SNRConfig(interval_steps=8, estimator="moments"), 2, 80, warmup_steps=10)
    assert moments.reads_between(3) == frozenset()
