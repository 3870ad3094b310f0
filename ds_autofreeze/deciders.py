"""Freeze deciders: per-block statistics in, new frozen-prefix boundary out.

A decider never touches the model or the optimizer; the engine feeds it and applies its answer.
Each is registered by the ``name`` its config carries, so the JSON selects it from a closed set.
Boundaries are counts of frozen blocks: ``k`` means blocks 0..k-1 (and the embeddings) are frozen.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import numpy as np

from .config import ConfigError, GradNormConfig, ScheduleConfig, StaticConfig, _DeciderBase


class Decider:
    """Base of all deciders. ``decide`` is called after every optimizer step."""

    needs_grad_stats = False  # whether the engine must accumulate gradients for it

    def __init__(self, config: _DeciderBase, num_blocks: int, total_steps: Optional[int]):
        self.config = config
        self.num_blocks = num_blocks
        self.total_steps = total_steps
        # The head is never frozen and neither are the last ``min_trainable`` blocks.
        self.max_frozen = max(0, num_blocks - config.min_trainable)

    def is_decision_step(self, step: int) -> bool:
        """Whether ``decide`` needs statistics at optimizer step ``step`` (1-based)."""
        return False

    def decide(self, step: int, boundary: int, block_norms: Optional[Sequence[float]] = None) -> int:
        """New boundary (>= ``boundary``) after optimizer step ``step``."""
        raise NotImplementedError

    def clamp(self, boundary: int, proposal: int) -> int:
        return max(boundary, min(proposal, self.max_frozen))

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class GradNormDecider(Decider):
    """AutoFreeze's rule (arXiv 2102.01386, section 3.1).

    Every ``interval`` steps the engine hands in, per block, the L1 norm of the gradient summed
    over the interval (all-reduced across ranks). The change ratio of block i is
    |prev_i - cur_i| / prev_i; the threshold is the ``percentile`` of the ratios of the blocks
    still trainable, and everything before the first trainable block whose ratio reaches the
    threshold freezes. The first decision only records norms.

    Two guards, off by default (the paper's rule): ``max_ratio`` also requires a block's ratio to
    be small in absolute terms, and ``patience`` requires a block to qualify at that many
    consecutive decisions. The percentile alone is relative: at every decision it ranks about
    half the blocks as "slow", so on a run whose blocks all still change (or whose short
    intervals are dominated by batch noise) it freezes on chance.
    """

    needs_grad_stats = True

    def __init__(self, config: GradNormConfig, num_blocks: int, total_steps: Optional[int]):
        super().__init__(config, num_blocks, total_steps)
        if config.interval_steps is None and total_steps is None:
            raise ConfigError("autofreeze.decider.num_intervals needs autofreeze.total_steps "
                              "(launch/finetune.py fills it); or set decider.interval_steps")
        self.interval = config.interval_steps or max(1, total_steps // config.num_intervals)
        self.prev_norms: Optional[list[float]] = None
        # Every decision with what it saw (all-reduced norms, ratios, threshold), so a user can
        # see why blocks froze when they did (launch/finetune.py writes it to all_results.json).
        self.log: list[dict[str, Any]] = []
        self.streak = [0] * num_blocks  # consecutive decisions each block qualified at

    def is_decision_step(self, step: int) -> bool:
        return step > 0 and step % self.interval == 0

    def decide(self, step: int, boundary: int, block_norms: Optional[Sequence[float]] = None) -> int:
        if not self.is_decision_step(step):
            return boundary
        if block_norms is None or len(block_norms) != self.num_blocks:
            raise ValueError(f"gradnorm needs {self.num_blocks} block norms at step {step}")
        cur = [float(x) for x in block_norms]
        record: dict[str, Any] = {"step": step, "block_norms": [float(f"{x:.6g}") for x in cur]}
        self.log.append(record)
        if not all(math.isfinite(cur[i]) for i in range(boundary, self.num_blocks)):
            # An overflowed or broken interval says nothing about convergence: skip it, and
            # keep comparing against the last good one.
            record["skipped"] = "non-finite norms"
            return boundary
        prev, self.prev_norms = self.prev_norms, cur
        if prev is None:
            return boundary
        trainable = range(boundary, self.num_blocks)
        # A block whose previous norm is zero has no meaningful ratio; it counts as changing.
        ratios = [abs(prev[i] - cur[i]) / prev[i] if prev[i] > 0 else math.inf for i in trainable]
        finite = [r for r in ratios if math.isfinite(r)]
        if not finite:
            return boundary
        threshold = float(np.percentile(finite, self.config.percentile))
        cap = self.config.max_ratio if self.config.max_ratio is not None else math.inf
        for i, r in zip(trainable, ratios):
            self.streak[i] = self.streak[i] + 1 if r < threshold and r <= cap else 0
        first_changing = next((i for i in trainable if self.streak[i] < self.config.patience), self.num_blocks)
        new = self.clamp(boundary, first_changing)
        # Per block; frozen blocks (and zero previous norms) have none.
        record.update(ratios=[None] * boundary + [float(f"{r:.4g}") if math.isfinite(r) else None for r in ratios],
                      threshold=float(f"{threshold:.4g}"), boundary=new)
        return new

    def state_dict(self) -> dict[str, Any]:
        return {"prev_norms": self.prev_norms, "log": self.log, "streak": self.streak}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.prev_norms = state["prev_norms"]
        self.log = state.get("log", [])
        self.streak = state.get("streak", [0] * self.num_blocks)


class StaticDecider(Decider):
    """The first ``num_frozen_blocks`` blocks are frozen before the first step and stay frozen."""

    def __init__(self, config: StaticConfig, num_blocks: int, total_steps: Optional[int]):
        super().__init__(config, num_blocks, total_steps)
        if config.num_frozen_blocks > self.max_frozen:
            raise ConfigError(f"autofreeze.decider.num_frozen_blocks={config.num_frozen_blocks} leaves fewer "
                             f"than min_trainable={config.min_trainable} of {num_blocks} blocks trainable")

    def decide(self, step: int, boundary: int, block_norms: Optional[Sequence[float]] = None) -> int:
        return self.clamp(boundary, self.config.num_frozen_blocks)


class ScheduleDecider(Decider):
    """Boundary ``num_frozen_blocks`` from step ``round(fraction * total_steps)`` on."""

    def __init__(self, config: ScheduleConfig, num_blocks: int, total_steps: Optional[int]):
        super().__init__(config, num_blocks, total_steps)
        if total_steps is None:
            raise ConfigError("autofreeze.decider.schedule needs autofreeze.total_steps (launch/finetune.py fills it)")
        for entry in config.schedule:
            if entry.num_frozen_blocks > self.max_frozen:
                raise ConfigError(f"autofreeze.decider.schedule: num_frozen_blocks={entry.num_frozen_blocks} "
                                 f"leaves fewer than min_trainable={config.min_trainable} of {num_blocks} "
                                 "blocks trainable")
        self.steps = [(round(e.fraction * total_steps), e.num_frozen_blocks) for e in config.schedule]

    def decide(self, step: int, boundary: int, block_norms: Optional[Sequence[float]] = None) -> int:
        due = [k for at, k in self.steps if step >= at]
        return self.clamp(boundary, max(due)) if due else boundary


DECIDERS: dict[str, type[Decider]] = {
    "gradnorm": GradNormDecider,
    "static": StaticDecider,
    "schedule": ScheduleDecider,
}


def build_decider(config: _DeciderBase, num_blocks: int, total_steps: Optional[int]) -> Decider:
    return DECIDERS[config.name](config, num_blocks, total_steps)
