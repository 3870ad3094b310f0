"""The ``"autofreeze"`` section of a DeepSpeed JSON config, validated before anything runs.

Every key is declared once here, with its default, its constraint and a docstring; nothing
else in the package falls back to a default of its own. Pydantic forbids unknown keys, so a
misspelt key fails at startup with an error that names it (as DeepSpeed's own config models do).
"""
from __future__ import annotations

import math
from enum import Enum
from typing import Annotated, Any, Literal, Mapping, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

AUTOFREEZE = "autofreeze"


class ConfigError(ValueError):
    """A config value is wrong; the message names the key."""


class _ConfigModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, validate_default=True,
                              use_attribute_docstrings=True)


class _DeciderBase(_ConfigModel):
    min_trainable: Union[int, float] = Field(1, gt=0)
    """The last ``min_trainable`` blocks are never frozen (the head never is): a count, or a fraction
    of the model's blocks (rounded to the nearest block, at least one), so that one config keeps the
    same share trainable on a 6- and a 24-block model."""

    @field_validator("min_trainable")
    @classmethod
    def _count_or_fraction(cls, value: Union[int, float]) -> Union[int, float]:
        if value < 1:
            return value
        if value != int(value):
            raise ValueError(f"{value} is neither a count of blocks (an integer >= 1) nor a fraction of them (< 1)")
        return int(value)

    def trainable_floor(self, num_blocks: int) -> int:
        """``min_trainable`` in blocks, for a model of ``num_blocks``."""
        if isinstance(self.min_trainable, int):
            return self.min_trainable
        return max(1, math.floor(self.min_trainable * num_blocks + 0.5))


class _IntervalDeciderBase(_DeciderBase):
    num_intervals: int = Field(10, ge=2)
    """Decisions per run: one every ``total_steps // num_intervals`` optimizer steps."""
    interval_steps: Optional[int] = Field(None, ge=1)
    """Optimizer steps between decisions; overrides ``num_intervals`` when set."""


class GradNormConfig(_IntervalDeciderBase):
    """The paper's rule: freeze the prefix of blocks whose gradient norm stopped changing."""
    name: Literal["gradnorm"] = "gradnorm"
    percentile: float = Field(50.0, ge=0.0, le=100.0)
    """Threshold on the per-block gradient-norm change ratios of the trainable blocks."""
    max_ratio: Optional[float] = Field(None, gt=0.0)
    """A block freezes only if its change ratio is also at most this (an absolute "stopped
    changing"); None is the paper's rule, where the percentile alone decides — and, being
    relative, freezes the slower half even while every block still changes a lot."""
    patience: int = Field(1, ge=1)
    """Consecutive decisions a block must qualify at before it freezes (1: the paper's rule)."""


class SNRConfig(_IntervalDeciderBase):
    """Freeze the prefix of blocks whose remaining learning is indistinguishable from gradient noise
    (ds_autofreeze/deciders.py, docs/deciders.md)."""
    name: Literal["snr"] = "snr"
    min_trainable: Union[int, float] = Field(0.67, gt=0)
    """As for every decider, but two thirds of the blocks stay trainable by default: with 2 of
    MiniLM's 6 this rule froze 4 blocks of multiple choice at 63% of training and lost 3 points;
    with 4 of 6 its freezes cost within the seed noise on multiple choice (docs/deciders.md). A
    fraction, so that a 24-block model keeps the measured share, not 4 blocks."""
    num_intervals: int = Field(20, ge=2)
    """Decisions per run (the signal and noise of each block are estimated over one interval)."""
    estimator: Literal["moments", "adam"] = "adam"
    """How the per-step signal-to-noise ratio is estimated: ``moments`` from the interval's summed
    gradient and summed squared gradient norms, ``adam`` from Adam's first and second moments."""
    adam_reference: Literal["v", "recent"] = "v"
    """What the ``adam`` estimator divides sum(m^2) by. ``v``: Adam's second moment, which on a
    fine-tuning run averages the whole run (b2 = 0.999): while the gradient scale rises (block 0 of
    the watch runs: the recent scale 1.8-2.5x v's early in the run) noise reads as signal,
    while it falls the reads go below zero (second-half means down to -0.03 on IMDb's last block,
    -0.04 on MPNet's, where the per-step SNR is >= 0). ``recent``: the squared gradient norm
    weighted as the noise in m is (b1^(2i) for the gradient i steps back), read by a step hook: a
    pass over the gradients per step, 16 bytes per block; unbiased at any scale. Measured on the
    three tasks it is not the safer choice, so the default stays ``v`` (docs/deciders.md, "Adam's v
    remembers the whole run")."""
    z: float = Field(1.0, gt=0.0)
    """A block is done when the signal-to-noise ratio of everything the rest of the run could still
    add to it (per-step SNR x effective remaining steps) is below z^2."""
    arm: float = Field(1.0, gt=0.0)
    """A block can freeze only after its signal once showed: K x per-step SNR at least this (K the
    interval's steps, or Adam's 1 / (1 - b1); the ``adam`` estimator also reads it after every step
    of the learning-rate warmup). A block that never showed signal is not "converged" but unmeasured
    (pure noise, too-short intervals), and stays trainable."""
    window: int = Field(3, ge=1)
    """Decisions whose per-step SNR estimates are averaged for each decision; only estimates whose
    statistic starts after the learning-rate warmup count (the interval's K steps, or Adam's
    1 / (1 - b1) steps past it), so a block freezes ``window`` such decisions after it at the earliest."""
    confidence: float = Field(1.0, ge=0.0)
    """Standard errors of that average added before comparing (an upper bound: what is left to learn
    is more likely over- than underestimated)."""
    patience: int = Field(1, ge=1)
    """Consecutive decisions a block must be done at before it freezes."""

    @model_validator(mode="after")
    def _reference_needs_adam(self) -> "SNRConfig":
        if self.estimator != "adam" and self.adam_reference != "v":
            raise ValueError("adam_reference sets what Adam's ratio is read against: it needs estimator 'adam'")
        return self


class DriftConfig(_IntervalDeciderBase):
    """Freeze the prefix of blocks whose output on a fixed probe set would change less than
    ``tolerance`` over the rest of the run."""
    name: Literal["drift"] = "drift"
    num_intervals: int = Field(20, ge=2)
    """Decisions per run (each measures every trainable block's output on the probe set)."""
    tolerance: float = Field(0.02, gt=0.0)
    """Largest relative change of a block's probe output, forecast over the remaining learning-rate
    budget, at which it freezes."""
    patience: int = Field(2, ge=1)
    """Consecutive decisions a block must qualify at before it freezes."""


class StaticConfig(_DeciderBase):
    """Freeze the first ``num_frozen_blocks`` blocks from step 0 (Lee et al.'s baseline)."""
    name: Literal["static"] = "static"
    num_frozen_blocks: int = Field(..., ge=0)
    """Blocks frozen for the whole run (embeddings included once this is >= 1)."""


class ScheduleStep(_ConfigModel):
    fraction: float = Field(..., ge=0.0, le=1.0)
    """Fraction of ``total_steps`` at which this boundary takes effect."""
    num_frozen_blocks: int = Field(..., ge=0)
    """Blocks frozen from then on."""


class ScheduleConfig(_DeciderBase):
    """Freeze block prefixes at fixed fractions of training (PipeTransformer / Composer style)."""
    name: Literal["schedule"] = "schedule"
    schedule: list[ScheduleStep] = Field(..., min_length=1)
    """Ordered by fraction; boundaries must not decrease (freezing is a prefix that only grows)."""

    @model_validator(mode="after")
    def _monotone(self) -> "ScheduleConfig":
        for prev, cur in zip(self.schedule, self.schedule[1:]):
            if cur.fraction < prev.fraction or cur.num_frozen_blocks < prev.num_frozen_blocks:
                raise ValueError("schedule entries must be sorted by fraction with non-decreasing "
                                 "num_frozen_blocks")
        return self


DeciderConfig = Annotated[Union[GradNormConfig, SNRConfig, DriftConfig, StaticConfig, ScheduleConfig],
                          Field(discriminator="name")]


class CachePolicy(str, Enum):
    pinned = "pinned"
    """Entries stay in RAM once admitted; new entries go to disk when RAM is full. With reshuffled
    epochs this hits about the RAM fraction of the working set, near the best any policy can do."""
    lru = "lru"
    """Least recently used is evicted to disk. Under reshuffled epochs it hits far less than pinned."""


class CacheConfig(_ConfigModel):
    """Activation cache of the frozen prefix's output (see ds_autofreeze/cache.py)."""
    enabled: bool = False
    """Skip the frozen blocks' forward pass by storing their output per training example."""
    ram_bytes: int = Field(2 * 1024 ** 3, ge=0)
    """Budget of the RAM tier, per rank."""
    disk_dir: Optional[str] = None
    """Directory of the disk (NVMe) tier; None: ``<output_dir>/activation_cache``. Created 0700."""
    disk_bytes: int = Field(16 * 1024 ** 3, ge=0)
    """Budget of the disk tier, per rank; 0 disables it. Past both budgets, outputs are recomputed."""
    prefetch_depth: int = Field(4, ge=0)
    """Batches read ahead from the disk tier in a background thread (the epoch's order is known)."""
    policy: CachePolicy = CachePolicy.pinned
    """RAM-tier eviction policy: ``pinned`` or ``lru``."""


class PackingMode(str, Enum):
    off = "off"
    """Keep the world size the run was launched with."""
    performance = "performance"
    """At each freeze, move to the (workers, micro-batch, accumulation) that finishes soonest."""
    efficiency = "efficiency"
    """At each freeze, move to the plan with the least worker-hours x price that meets the deadline."""


class PackingConfig(_ConfigModel):
    """Re-packing the job onto fewer or more workers as blocks freeze (ds_autofreeze/packing.py;
    the cost model is in docs/packing.md). The global batch stays fixed."""
    mode: PackingMode = PackingMode.off
    """``off``, ``performance`` or ``efficiency``."""
    max_workers: Optional[int] = Field(None, ge=1)
    """Most workers a plan may use; None: the world size the run was launched with."""
    workers_per_node: Optional[int] = Field(None, ge=1)
    """Workers sharing a node's fast links; None: the launch's local world size."""
    worker_price_per_hour: float = Field(1.0, gt=0)
    """Price of one worker for an hour, in any currency: costs are reported in it."""
    deadline_seconds: Optional[float] = Field(None, gt=0)
    """Efficiency mode: finish training within this many seconds of its start, if any plan can."""
    worker_memory_bytes: Optional[int] = Field(None, ge=1)
    """Memory one worker may use; None: the accelerator's memory (unbounded on CPU)."""
    intra_node_bandwidth: Optional[float] = Field(None, gt=0)
    """All-reduce bandwidth inside a node, bytes/s; None: measured at start (2+ workers)."""
    inter_node_bandwidth: Optional[float] = Field(None, gt=0)
    """All-reduce bandwidth across nodes, bytes/s; None: the measured one."""
    restart_seconds: float = Field(60.0, ge=0)
    """What a re-pack costs (checkpoint, relaunch, reload): a move must save more than this."""
    max_micro_batch: Optional[int] = Field(None, ge=1)
    """Largest micro-batch a plan may use (besides the memory limit)."""


class AutoFreezeConfig(_ConfigModel):
    enabled: bool = True
    """Freeze blocks during training. A config without an ``autofreeze`` section is off."""
    total_steps: Optional[int] = Field(None, ge=1)
    """Optimizer steps of the whole run. ``launch/finetune.py`` fills it from the data and epochs;
    needed by the deciders that reason in fractions of training."""
    decider: DeciderConfig = Field(default_factory=SNRConfig)
    """Which rule decides the frozen prefix, and its parameters (``name`` picks the rule). The default
    is the measured one (``snr``); the paper's ``gradnorm`` lost 5 F1 on extractive QA here."""
    cache: CacheConfig = Field(default_factory=CacheConfig)
    """Activation cache of the frozen prefix."""
    packing: PackingConfig = Field(default_factory=PackingConfig)
    """Re-packing onto another number of workers at freezes (launch/finetune.py runs only)."""
    log_freezes: bool = True
    """Print one line on rank 0 each time the boundary moves."""
    replicate_frozen_weights: bool = True
    """ZeRO-3: gather the frozen blocks' weights once, at the freeze, into a plain copy on every rank
    and run the frozen prefix on it, so they leave the per-step all-gathers (cache or not). Costs
    their full size on every rank (a 7B model in bf16 with two thirds frozen: about 9 GB); False
    keeps them partitioned and gathered at every forward, as DeepSpeed does. No effect below ZeRO-3."""
    rescale_clipping: bool = True
    """At each freeze, scale DeepSpeed's ``gradient_clipping`` threshold by the square root of the
    share of the squared gradient norm that stays trainable (from Adam's second moments, summed over
    the ranks), so that the blocks that keep training are clipped about as in full fine-tuning.
    Without it, the frozen blocks' gradients leave the clipped norm and every later step of the
    others grows: on MiniLM-L6, freezing 2 of 6 blocks raised their clip factor by a median 1.3x on
    extractive QA and 1.8x on multiple choice, and the shipped rule lost 1.34 F1 on QA's mean of
    three seeds where with the rescale it loses 0.86, within the seed spread (docs/deciders.md).
    False keeps the threshold, as plain freezing does (the README's ``gradnorm`` rows were measured so).
    No effect without clipping, or before the optimizer's first step (nothing measured yet)."""
    rescale_from: Literal["run", "interval"] = "run"
    """Over which steps ``rescale_clipping`` measures the frozen share. ``run``: Adam's second moments
    as they are, whose b2 = 0.999 averages about 1,000 steps, i.e. the whole of a short run, while
    the front blocks' share of the norm moves (on multiple choice 0.57 over the run's first half for
    2 blocks, 0.69 over its last interval; replayed, the staying blocks' clip factor stays 1.18x
    (4 blocks: 2.06x) of full fine-tuning's, against 0.99x (1.02x) with the last interval).
    ``interval``: their change since the decider's previous decision, i.e. the last interval's
    squared gradients (an extra read of Adam's second moments at each decision of an interval
    decider, nothing per step). Falls back to ``run`` where there is no earlier decision to
    difference with (the first decision, a hand-called ``freeze``, a ``schedule`` decider).
    ``run`` stays the default because the shipped setting's accuracy was measured with it; with
    ``min_trainable`` 2 of 6 on multiple choice ``interval`` lost 1.92 points on the mean of three
    seeds where ``run`` lost 2.50 (docs/deciders.md)."""
    log_statistics: bool = False
    """Measure every per-block statistic (gradient moments, Adam's moments, the recent gradient
    scale, probe drift, update progress) at each decision of an interval decider and log them with it, whatever the
    decider reads (watch runs for bench/decider_study.py). Also keeps the last 8 intervals' gradient sums (8 x 4 bytes per
    trainable parameter / world size) and probe outputs, so the log replays exactly at up to 8
    times the interval."""
    probe_examples: int = Field(64, ge=1)
    """Training examples in the fixed probe set of the drift statistic (sharded over the ranks)."""


def _format_error(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in (AUTOFREEZE, *first["loc"]))
    return f"{loc}: {first['msg']}"


def get_autofreeze_config(param_dict: Mapping[str, Any]) -> AutoFreezeConfig:
    """Validate the ``autofreeze`` section of a DeepSpeed config dict (absent means disabled)."""
    section = param_dict.get(AUTOFREEZE)
    if section is None:
        return AutoFreezeConfig(enabled=False)
    if not isinstance(section, Mapping):
        raise ConfigError(f"{AUTOFREEZE}: must be an object, got {type(section).__name__}")
    try:
        return AutoFreezeConfig.model_validate(dict(section))
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None
