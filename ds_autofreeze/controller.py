"""The freeze decision, in one place: the decider, the statistics it reads, and their state.

``FreezeController.decide(step, boundary)`` is called after every optimizer step. At the decider's
decision steps it measures what the decider ``needs`` (every statistic with ``log_statistics``),
hands it over, and returns the decider's boundary (between them, what the decider ``reads_between``,
which cannot move it); the caller applies it (``freeze``). Statistics are decided on by every rank
from all-reduced sums, and the boundary is rank 0's, broadcast, so ranks never diverge.
"""
from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from deepspeed import comm as dist

from .config import AutoFreezeConfig, ConfigError
from .deciders import Decider, build_decider
from .model_adapter import ModelAdapter
from .repartition import OptimizerLayout
from .statistics import BlockStats, GradientMoments, ProbeDrift, UpdateProgress, adam_moments, lr_at

ALL_STATISTICS = frozenset({"grad", "adam", "scale", "drift", "progress"})
# Watch runs (log_statistics) keep this many past intervals' gradient sums and probe outputs, so
# their logs replay exactly at up to this many times their interval (BlockStats.merge).
LOGGED_HISTORY = 8


class FreezeController:
    """Decider + statistics for one engine (see the module doc)."""

    def __init__(self, config: AutoFreezeConfig, adapter: ModelAdapter, optimizer: Any, lr_scheduler: Any,
                 device: torch.device):
        self.config, self.adapter, self.device = config, adapter, device
        self.lrs = _schedule(lr_scheduler, optimizer, config.total_steps)
        # The warmup ends where the learning rate peaks; no decision reads statistics before.
        warmup = max(range(len(self.lrs)), key=lambda i: self.lrs[i]) + 1 if self.lrs else 0
        self.decider: Decider = build_decider(config.decider, adapter.num_blocks, config.total_steps, warmup)
        self.measure = (self.decider.needs | ALL_STATISTICS) if config.log_statistics else self.decider.needs
        self.moments: Optional[GradientMoments] = None
        self.progress: Optional[UpdateProgress] = None
        self.scale_state: Optional[dict[str, Any]] = None  # the recent gradient scale between optimizers
        self.layout: Optional[OptimizerLayout] = None
        self.probe: Optional[ProbeDrift] = None
        self.history = LOGGED_HISTORY if config.log_statistics else 0

    def release(self) -> None:
        """Let go of the optimizer (before it is rebuilt): the gradient sums view its partitions; the
        recent gradient scale (a few floats) is kept for the next ``bind``."""
        if self.moments is not None:
            self.scale_state = self.moments.scale_state()
            self.moments.close()
        if self.progress is not None:
            self.progress.close()
        self.moments = self.progress = self.layout = None

    def bind(self, optimizer: Any) -> None:
        """(Re)attach to the optimizer, after it is built or rebuilt: the gradient sums start over,
        laid out over the new partitions; the recent gradient scale carries on."""
        self.release()
        world = dist.get_world_size() if dist.is_initialized() else 1
        rank = dist.get_rank() if dist.is_initialized() else 0
        self.layout = OptimizerLayout(optimizer, rank, world)
        if "adam" in self.decider.needs and "betas" not in self.layout.inner.param_groups[0]:
            # Without Adam's moments the statistic never exists and the run would silently never freeze.
            raise ConfigError(f"autofreeze.decider.estimator: 'adam' reads Adam's moments, and the optimizer "
                              f"({type(self.layout.inner).__name__}) keeps none: use an Adam-type optimizer, "
                              f"or \"estimator\": \"moments\"")
        if self.measure & {"grad", "scale"} and self.decider.interval is not None:
            # The scale decays as the noise in Adam's first moment does: b1 per step, squared.
            betas = self.layout.inner.param_groups[0].get("betas")
            decay = betas[0] ** 2 if "scale" in self.measure and betas else None
            self.moments = GradientMoments(self.layout, self._block_of(), self.adapter.num_blocks, self.history,
                                           sums="grad" in self.measure, scale_decay=decay)
            if self.scale_state is not None:
                self.moments.load_scale(self.scale_state)
        # Progress is Adam's update recomputed: optimizers without its moments log none. Its rows are
        # collected at decisions only: a decider without any would pile them up.
        if "progress" in self.measure and self.decider.interval is not None \
                and "betas" in self.layout.inner.param_groups[0]:
            self.progress = UpdateProgress(self.layout, self._block_of(), self.adapter.num_blocks)

    def set_probe(self, batch: dict[str, torch.Tensor]) -> None:
        """This rank's shard of the probe set for the drift statistic (same size on every rank)."""
        self.probe = ProbeDrift(self.adapter, batch, self.history)

    def decide(self, step: int, boundary: int) -> int:
        for hook in (self.moments, self.progress):
            if hook is not None:
                hook.advance()
        deciding = self.decider.is_decision_step(step)
        reads = self.measure if deciding else self.decider.reads_between(step)
        stats = self.statistics(step, boundary, reads) if reads else None
        new = self.decider.decide(step, boundary, stats)
        if deciding and dist.is_initialized() and dist.get_world_size() > 1:
            # Rank 0's decision is the one applied everywhere, so ranks can never diverge even if
            # float reductions differed. Deciders without statistics decide from the step alone.
            decided = torch.tensor([new], dtype=torch.long, device=self.device)
            dist.broadcast(decided, src=0)
            new = int(decided.item())
        return new

    def statistics(self, step: int, boundary: int, measure: frozenset[str]) -> BlockStats:
        """The statistics in ``measure`` after optimizer step ``step``; the gradient sums start a new
        interval (only decision steps read them)."""
        n = self.adapter.num_blocks
        measured = [b >= boundary for b in range(n)]
        stats = BlockStats(step=step, steps=0, grad_l1=[None] * n, grad_sum_sq=[None] * n, grad_sq_sum=[None] * n)
        if "grad" in measure and self.moments is not None:
            stats.steps, stats.grad_l1, stats.grad_sum_sq, stats.grad_sq_sum, stats.grad_dots = \
                self.moments.collect(measured)
        if "scale" in measure and self.moments is not None:
            stats.grad_sq_recent = self.moments.recent_scale(measured)
        if "progress" in measure and self.progress is not None:
            stats.progress, stats.progress_rest = self.progress.collect(measured)
        if "adam" in measure:
            stats.adam_m2, stats.adam_v, stats.adam_beta1, stats.adam_step = \
                adam_moments(self.layout, self._block_of(), n, measured)
        if "drift" in measure:
            if self.probe is None:
                if "drift" in self.decider.needs:
                    raise RuntimeError("the drift decider needs a probe set: set_probe(batch) before training")
            else:
                stats.drift, stats.drift_back = self.probe.measure(measured)
        if self.lrs:
            stats.lr = self.lrs[step - 1] if step - 1 < len(self.lrs) else self.lrs[-1]
            future = self.lrs[step:]
            stats.future_lr_sum = float(sum(future))
            stats.future_lr_sq_sum = float(sum(x * x for x in future))
        return stats

    def _block_of(self) -> dict[int, int]:
        return {id(p): b for b in range(self.adapter.num_frozen, self.adapter.num_blocks)
                for p in self.adapter.block_parameters(b)}

    @property
    def log(self) -> list[dict[str, Any]]:
        return self.decider.log

    def state_dict(self) -> dict[str, Any]:
        return self.decider.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name", self.decider.config.name) != self.decider.config.name:
            # A run resumed with another rule (e.g. a fixed schedule from a watch run's checkpoint)
            # starts that rule afresh.
            warnings.warn(f"autofreeze: the checkpoint's decider is {state['name']!r}, this run's "
                          f"{self.decider.config.name!r}: its state starts afresh", stacklevel=2)
            return
        self.decider.load_state_dict(state)

    def interval_state(self) -> Optional[dict[str, Any]]:
        """This rank's sums since the last decision (gradient moments, update progress), for a checkpoint."""
        state: dict[str, Any] = {}
        for sums in (self.moments, self.progress):
            if sums is not None:
                state.update(sums.state_dict())
        return state or None

    def load_interval_state(self, state: Optional[dict[str, Any]]) -> None:
        """This rank's sums since the last decision, as saved (None: none saved, or saved on another
        world size). They are laid out over this rank's partitions: otherwise the interval's sums
        start over, and the next decision covers the steps since (its K says so)."""
        if state is None:
            return
        if self.moments is not None and "sums" in state:
            self.moments.load_state_dict(state)
        if self.progress is not None:
            self.progress.load_state_dict(state)

    def close(self) -> None:
        self.release()


def _schedule(lr_scheduler: Any, optimizer: Any, total_steps: Optional[int]) -> list[float]:
    """The learning rate of every optimizer step of the run (1-based: index t - 1), or [] without
    ``total_steps``. A scheduler whose rates cannot be computed ahead counts as constant from its
    current rate: that overstates what is left to learn, so it can only freeze later."""
    if total_steps is None:
        return []
    probe = lr_at(lr_scheduler, optimizer, 1)
    if probe is None:
        warnings.warn(f"autofreeze: cannot read ahead the learning rates of {type(lr_scheduler).__name__}; "
                      "deciders assume the current one for the rest of the run", stacklevel=3)
        return [float(optimizer.param_groups[0]["lr"])] * total_steps
    return [lr_at(lr_scheduler, optimizer, t) for t in range(1, total_steps + 1)]
