"""Freeze deciders: per-block statistics in, new frozen-prefix boundary out.

A decider never touches the model or the optimizer; the engine measures what it ``needs`` at its
decision steps (``statistics.BlockStats``) and applies its answer. Each is registered by the
``name`` its config carries, so the JSON selects it from a closed set. Boundaries are counts of
frozen blocks: ``k`` means blocks 0..k-1 (and the embeddings) are frozen. Every decision is logged
(``log``) with what it saw, so a run says why blocks froze when they did.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np

from .config import (ConfigError, DriftConfig, GradNormConfig, ScheduleConfig, SNRConfig, StaticConfig,
                     _DeciderBase, _IntervalDeciderBase)
from .statistics import ADAM_FIRST_ESTIMATE, BlockStats


class Decider:
    """Base of all deciders. ``decide`` is called after every optimizer step."""

    needs: frozenset[str] = frozenset()  # statistics read at decision steps: "grad", "adam", "scale", "drift", "progress"

    def __init__(self, config: _DeciderBase, num_blocks: int, total_steps: Optional[int], warmup_steps: int = 0):
        self.config = config
        self.num_blocks = num_blocks
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        # The head is never frozen and neither are the last ``min_trainable`` blocks.
        self.max_frozen = max(0, num_blocks - config.trainable_floor(num_blocks))
        self.log: list[dict[str, Any]] = []

    def too_many(self, what: str) -> ConfigError:
        """The error for a config that would freeze past ``min_trainable``."""
        return ConfigError(f"autofreeze.decider.{what} leaves fewer than min_trainable={self.config.min_trainable} "
                           f"({self.num_blocks - self.max_frozen} of {self.num_blocks}) blocks trainable")

    @property
    def interval(self) -> Optional[int]:
        """Optimizer steps between decisions that read statistics (None: decides from the step alone)."""
        return None

    def is_decision_step(self, step: int) -> bool:
        return self.interval is not None and step > 0 and step % self.interval == 0

    def reads_between(self, step: int) -> frozenset[str]:
        """Statistics (of ``needs``) to read after ``step`` when it is not a decision step; ``decide``
        then gets them and must not move the boundary."""
        return frozenset()

    def decide(self, step: int, boundary: int, stats: Optional[BlockStats] = None) -> int:
        """New boundary (>= ``boundary``) after optimizer step ``step``."""
        raise NotImplementedError

    def clamp(self, boundary: int, proposal: int) -> int:
        return max(boundary, min(proposal, self.max_frozen))

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.config.name, "log": self.log}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.log = list(state.get("log", []))


class IntervalDecider(Decider):
    """A decider that reads statistics every ``interval`` steps and freezes the prefix of blocks that
    qualified at ``patience`` consecutive decisions (never during the learning-rate warmup)."""

    config: _IntervalDeciderBase

    def __init__(self, config: _IntervalDeciderBase, num_blocks: int, total_steps: Optional[int],
                 warmup_steps: int = 0):
        super().__init__(config, num_blocks, total_steps, warmup_steps)
        if config.interval_steps is None and total_steps is None:
            raise ConfigError("autofreeze.decider.num_intervals needs autofreeze.total_steps (launch/finetune.py "
                              "and the Trainer callback fill it); or set decider.interval_steps")
        self._interval = config.interval_steps or max(1, total_steps // config.num_intervals)
        self.streak = [0] * num_blocks  # consecutive decisions each block qualified at

    @property
    def interval(self) -> int:
        return self._interval

    def decide(self, step: int, boundary: int, stats: Optional[BlockStats] = None) -> int:
        if not self.is_decision_step(step):
            return boundary
        if stats is None:
            raise ValueError(f"{self.config.name} needs statistics at step {step}")
        record: dict[str, Any] = {"step": step, "stats": stats.to_json()}
        self.log.append(record)
        qualified = self.qualify(step, boundary, stats, record)
        if qualified is None:
            return boundary
        for b in range(boundary, self.num_blocks):
            self.streak[b] = self.streak[b] + 1 if qualified[b - boundary] else 0
        new = boundary
        if step > self.warmup_steps:
            first_unqualified = next((b for b in range(boundary, self.num_blocks)
                                      if self.streak[b] < self.config.patience), self.num_blocks)
            new = self.clamp(boundary, first_unqualified)
        else:
            record["warmup"] = True
        record["boundary"] = new
        return new

    def qualify(self, step: int, boundary: int, stats: BlockStats, record: dict[str, Any]) -> Optional[list[bool]]:
        """Per trainable block (boundary..), whether it may freeze by this decision's statistics; None
        to skip the decision (nothing changes, streaks are kept)."""
        raise NotImplementedError

    def none_frozen(self) -> str:
        """Why a run froze nothing, for its summary."""
        name = self.config.name
        if not self.max_frozen:
            return f"{name}: min_trainable={self.config.min_trainable} keeps every block trainable"
        if not self.log:
            return f"{name}: the run ended before its first decision (every {self.interval} steps)"
        if all("skipped" in r or r.get("warmup") for r in self.log):
            reasons = sorted({r.get("skipped", "inside the learning-rate warmup") for r in self.log})
            return f"{name}: no decision could freeze ({'; '.join(reasons)})"
        # Blocks freeze as a prefix: nothing froze because block 0 never qualified.
        return f"{name}: no decision found block 0 safe to freeze{self.why_not_block0()}"

    def why_not_block0(self) -> str:
        """What kept block 0 from qualifying, appended to ``none_frozen`` ("" where the log says it)."""
        return ""

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "streak": self.streak}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.streak = list(state.get("streak", [0] * self.num_blocks))


class GradNormDecider(IntervalDecider):
    """AutoFreeze's rule (arXiv 2102.01386, section 3.1).

    Every ``interval`` steps the engine hands in, per block, the L1 norm of the gradient summed
    over the interval (over all ranks). The change ratio of block i is |prev_i - cur_i| / prev_i;
    the threshold is the ``percentile`` of the ratios of the blocks still trainable, and
    everything before the first trainable block whose ratio reaches the threshold freezes. The
    first decision only records norms.

    Two guards, off by default (the paper's rule): ``max_ratio`` also requires a block's ratio to
    be small in absolute terms, and ``patience`` requires a block to qualify at that many
    consecutive decisions. The percentile alone is relative: at every decision it ranks about
    half the blocks as "slow", so on a run whose blocks all still change (or whose short
    intervals are dominated by batch noise) it freezes on chance.
    """

    needs = frozenset({"grad"})
    config: GradNormConfig

    def __init__(self, config: GradNormConfig, num_blocks: int, total_steps: Optional[int], warmup_steps: int = 0):
        # The paper decides from the first interval on, warmup or not.
        super().__init__(config, num_blocks, total_steps, 0)
        self.prev_norms: Optional[list[float]] = None

    def qualify(self, step: int, boundary: int, stats: BlockStats, record: dict[str, Any]) -> Optional[list[bool]]:
        cur = [math.nan if x is None else float(x) for x in stats.grad_l1]
        record["block_norms"] = [float(f"{x:.6g}") if math.isfinite(x) else None for x in cur]  # JSON has no NaN
        if not all(math.isfinite(cur[i]) for i in range(boundary, self.num_blocks)):
            # An overflowed or broken interval says nothing about convergence: skip it, and
            # keep comparing against the last good one.
            record["skipped"] = "non-finite norms"
            return None
        prev, self.prev_norms = self.prev_norms, cur
        if prev is None:
            return None
        trainable = range(boundary, self.num_blocks)
        # A block whose previous norm is zero has no meaningful ratio; it counts as changing.
        ratios = [abs(prev[i] - cur[i]) / prev[i] if prev[i] > 0 else math.inf for i in trainable]
        finite = [r for r in ratios if math.isfinite(r)]
        if not finite:
            return None
        threshold = float(np.percentile(finite, self.config.percentile))
        cap = self.config.max_ratio if self.config.max_ratio is not None else math.inf
        # Per block; frozen blocks (and zero previous norms) have none.
        record.update(ratios=[None] * boundary + [float(f"{r:.4g}") if math.isfinite(r) else None for r in ratios],
                      threshold=float(f"{threshold:.4g}"))
        return [r < threshold and r <= cap for r in ratios]

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "prev_norms": self.prev_norms}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.prev_norms = state["prev_norms"]


class SNRDecider(IntervalDecider):
    """Freeze a block once the rest of the run could not teach it anything distinguishable from noise.

    Per block b, from one interval's statistics: the per-step signal-to-noise ratio
    snr_b = ||mu_b||^2 / tr C_b of the global-batch gradient (``estimator`` ``moments``: the unbiased
    estimates of ``BlockStats.signal`` / ``noise``; ``adam``: from Adam's bias-corrected moments,
    rho = sum m^2 / sum v ~ (snr + c_t) / (snr + 1), c_t the share of noise Adam's average keeps at
    step t: ``BlockStats.adam_snr``; ``adam_reference`` says whether the noise floor is read against
    v or against the recent gradient scale). Summed over the rest of the run with its learning rates, the
    update the block would still receive has signal-to-noise ratio R x snr_b, R = (sum lr)^2 / sum
    lr^2 over the remaining steps (``future_steps``). The block is done when R x snr_b < z^2: what it
    could still learn would be drowned by noise.

    One interval's estimate is noisy where the per-step signal is small (it can come out negative):
    the decision reads the mean of the last ``window`` intervals' estimates plus ``confidence``
    standard errors of that mean (from their spread), an upper bound on what is left to learn.

    A block qualifies only once armed: its signal must once have been measurable (span x snr_b >=
    ``arm``, the span being the interval's K steps, or Adam's 1 / (1 - b1)). A block whose signal was
    never measurable (pure noise, intervals too short for its noise level) is not known to have
    converged and stays trainable; this is what keeps the rule from freezing on chance. With the
    ``adam`` estimator the arm also reads Adam's ratio after every step of the learning-rate warmup
    from the second (``statistics.ADAM_FIRST_ESTIMATE``):
    that is where fine-tuning shows its signal most, and a few steps either side of the one decision
    step that falls there decided whether a run could ever freeze (IMDb seed 43, span x snr of block 0:
    0.26 at step 18, 1.95 at step 20; docs/deciders.md). Blocks freeze as a prefix after ``patience``
    consecutive done decisions, never during the learning-rate warmup, and the window averages only
    estimates whose statistic starts after it: an interval that began in the warmup, or Adam's ratio
    less than 1 / (1 - b1) steps after it, still carries the warmup's transient (a 62-step run froze 2
    blocks at step 9, its window's estimates from steps 3, 6 and 9: docs/deciders.md).
    """

    config: SNRConfig

    def __init__(self, config: SNRConfig, num_blocks: int, total_steps: Optional[int], warmup_steps: int = 0):
        super().__init__(config, num_blocks, total_steps, warmup_steps)
        self.needs = frozenset({"grad"} if config.estimator == "moments" else
                               {"adam"} if config.adam_reference == "v" else {"adam", "scale"})
        self.armed_at: list[Optional[int]] = [None] * num_blocks  # the step each block armed at
        self.recent: list[list[float]] = [[] for _ in range(num_blocks)]  # last ``window`` estimates per block

    @property
    def armed(self) -> list[bool]:
        return [t is not None for t in self.armed_at]

    def reads_between(self, step: int) -> frozenset[str]:
        if self.config.estimator == "adam" and ADAM_FIRST_ESTIMATE <= step <= self.warmup_steps \
                and not all(self.armed):
            return self.needs
        return frozenset()

    def decide(self, step: int, boundary: int, stats: Optional[BlockStats] = None) -> int:
        if stats is not None and not self.is_decision_step(step):
            self.arm(boundary, stats)
            return boundary
        return super().decide(step, boundary, stats)

    def arm(self, boundary: int, stats: BlockStats) -> None:
        """Arm the trainable blocks whose signal ``stats`` shows (module doc)."""
        for b in range(boundary, self.num_blocks):
            s = self.snr(stats, b)
            if s is not None and self.armed_at[b] is None and self.span(stats) * s >= self.config.arm:
                self.armed_at[b] = stats.step

    def span(self, stats: BlockStats) -> float:
        """The steps one estimate stands for: the interval's K, or Adam's 1 / (1 - b1)."""
        return stats.steps if self.config.estimator == "moments" else 1.0 / (1.0 - stats.adam_beta1)

    def snr(self, stats: BlockStats, block: int) -> Optional[float]:
        if self.config.estimator == "moments":
            s, n = stats.signal(block), stats.noise(block)
            return s / n if s is not None and n is not None and n > 0 else None
        return stats.adam_snr(block, self.config.adam_reference)

    def qualify(self, step: int, boundary: int, stats: BlockStats, record: dict[str, Any]) -> Optional[list[bool]]:
        future = stats.future_steps()
        snrs = [self.snr(stats, b) for b in range(boundary, self.num_blocks)]
        if future is None or any(s is None or not math.isfinite(s) for s in snrs):
            record["skipped"] = "no signal-to-noise estimate" if future is not None else "no learning-rate schedule"
            return None
        self.arm(boundary, stats)
        cfg, bounds = self.config, []
        # An estimate whose statistic remembers the warmup (its interval started there, or Adam's
        # average still weighs it by more than b1^span) carries the warmup's transient: not averaged.
        settled = step - self.warmup_steps >= self.span(stats) - 1e-9  # 1 / (1 - 0.9) is 10.000000000000002
        for b, s in zip(range(boundary, self.num_blocks), snrs):
            if settled:
                self.recent[b] = (self.recent[b] + [s])[-cfg.window:]
            bounds.append(_upper_mean(self.recent[b], cfg.confidence) if len(self.recent[b]) == cfg.window else None)
        record.update(snr=[None] * boundary + [float(f"{s:.4g}") for s in snrs],
                      snr_upper=[None] * boundary + [None if u is None else float(f"{u:.4g}") for u in bounds],
                      future_steps=float(f"{future:.4g}"), armed=self.armed)
        if not settled:
            record["settling"] = True
        return [self.armed_at[b] is not None and u is not None and future * u < cfg.z ** 2
                for b, u in zip(range(boundary, self.num_blocks), bounds)]

    def why_not_block0(self) -> str:
        at = self.armed_at[0]
        if at is None:
            return f": it never showed a measurable signal (span x snr >= decider.arm = {self.config.arm})"
        armed = f"armed at step {at}" if at else "armed before its checkpoint"
        if all(not r.get("snr_upper") or r["snr_upper"][0] is None for r in self.log):
            return (f" ({armed}): the run ended before {self.config.window} decision(s) whose statistics "
                    f"start after the warmup (decider.window)")
        return (f" ({armed}): what the rest of the run could still add to it never stayed below the noise "
                f"(z = {self.config.z}) for {self.config.patience} consecutive decision(s)")

    def state_dict(self) -> dict[str, Any]:
        # "armed" (the flags alone) too: code from before armed_at reads only that key, and would
        # otherwise resume with every block unarmed.
        return {**super().state_dict(), "armed_at": self.armed_at, "armed": self.armed, "recent": self.recent}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        # Checkpoints from before the arming step was kept hold flags only: 0, a step no block arms at
        # (Adam's ratio estimates from step 2, an interval's moments from its end), marks it unknown.
        flags = state.get("armed", [False] * self.num_blocks)
        self.armed_at = list(state.get("armed_at", [0 if a else None for a in flags]))
        self.recent = [list(r) for r in state.get("recent", [[] for _ in range(self.num_blocks)])]


def _upper_mean(values: list[float], confidence: float) -> float:
    """The mean of ``values`` plus ``confidence`` standard errors of it (from their spread)."""
    mean = sum(values) / len(values)
    if len(values) < 2 or not confidence:
        return mean
    variance = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean + confidence * math.sqrt(variance / len(values))


class DriftDecider(IntervalDecider):
    """Freeze a block once its output on a fixed probe set would move less than ``tolerance`` over
    the rest of the run: the interval's relative output change d_b, scaled by the learning rate
    still to come over the learning rate the interval used (a block moving steadily moves in
    proportion to it), is below the tolerance. The probe has no batch noise; the same forecast
    bounds how stale cached activations of the block would have become."""

    needs = frozenset({"drift"})
    config: DriftConfig

    def __init__(self, config: DriftConfig, num_blocks: int, total_steps: Optional[int], warmup_steps: int = 0):
        super().__init__(config, num_blocks, total_steps, warmup_steps)
        self.prev_future_lr: Optional[float] = None

    def qualify(self, step: int, boundary: int, stats: BlockStats, record: dict[str, Any]) -> Optional[list[bool]]:
        prev, self.prev_future_lr = self.prev_future_lr, stats.future_lr_sum
        drifts = [None if stats.drift is None else stats.drift[b] for b in range(boundary, self.num_blocks)]
        if prev is None or stats.future_lr_sum is None or any(d is None for d in drifts):
            return None
        used = prev - stats.future_lr_sum
        if used <= 0:
            return None
        forecast = [d * stats.future_lr_sum / used for d in drifts]
        record["forecast"] = [None] * boundary + [float(f"{f:.4g}") for f in forecast]
        return [f < self.config.tolerance for f in forecast]

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "prev_future_lr": self.prev_future_lr}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.prev_future_lr = state.get("prev_future_lr")


class StaticDecider(Decider):
    """The first ``num_frozen_blocks`` blocks are frozen before the first step and stay frozen."""

    config: StaticConfig

    def __init__(self, config: StaticConfig, num_blocks: int, total_steps: Optional[int], warmup_steps: int = 0):
        super().__init__(config, num_blocks, total_steps, warmup_steps)
        if config.num_frozen_blocks > self.max_frozen:
            raise self.too_many(f"num_frozen_blocks={config.num_frozen_blocks}")

    def decide(self, step: int, boundary: int, stats: Optional[BlockStats] = None) -> int:
        return self.clamp(boundary, self.config.num_frozen_blocks)


class ScheduleDecider(Decider):
    """Boundary ``num_frozen_blocks`` from step ``round(fraction * total_steps)`` on."""

    config: ScheduleConfig

    def __init__(self, config: ScheduleConfig, num_blocks: int, total_steps: Optional[int], warmup_steps: int = 0):
        super().__init__(config, num_blocks, total_steps, warmup_steps)
        if total_steps is None:
            raise ConfigError("autofreeze.decider.schedule needs autofreeze.total_steps (launch/finetune.py fills it)")
        for entry in config.schedule:
            if entry.num_frozen_blocks > self.max_frozen:
                raise self.too_many(f"schedule: num_frozen_blocks={entry.num_frozen_blocks}")
        self.steps = [(round(e.fraction * total_steps), e.num_frozen_blocks) for e in config.schedule]

    def decide(self, step: int, boundary: int, stats: Optional[BlockStats] = None) -> int:
        due = [k for at, k in self.steps if step >= at]
        return self.clamp(boundary, max(due)) if due else boundary


DECIDERS: dict[str, type[Decider]] = {
    "gradnorm": GradNormDecider,
    "snr": SNRDecider,
    "drift": DriftDecider,
    "static": StaticDecider,
    "schedule": ScheduleDecider,
}


def build_decider(config: _DeciderBase, num_blocks: int, total_steps: Optional[int], warmup_steps: int = 0) -> Decider:
    return DECIDERS[config.name](config, num_blocks, total_steps, warmup_steps)
