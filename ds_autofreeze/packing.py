"""Performance and Efficiency Packing: how many workers, what micro-batch, how much accumulation,
as the trainable suffix shrinks. The cost model is written down in docs/packing.md.

The global batch (workers x micro-batch x accumulation) never changes, so re-packing changes
where the work runs, not what is optimized. Freezing shrinks a step three ways: frozen blocks
run forward only (or not at all with the activation cache), they keep no activations for
backward (bigger micro-batches fit), and their gradients leave the all-reduce (fewer workers pay
less and more workers pay less too). The planner prices every feasible plan with the model below
and picks the fastest (performance) or the cheapest that meets a deadline (efficiency).
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Optional, Sequence

import torch

if TYPE_CHECKING:
    from .config import PackingConfig
    from .model_adapter import ModelAdapter


@dataclass(frozen=True)
class Workload:
    """The model and the run as the cost model sees them. Per-example times and bytes; block 0
    carries the embeddings' parameters (they freeze with it)."""

    global_batch: int
    block_forward_seconds: tuple[float, ...]  # per example, one entry per block
    block_params: tuple[int, ...]
    block_activation_bytes: tuple[float, ...]  # per example, kept for backward while the block trains
    head_forward_seconds: float = 0.0
    head_params: int = 0
    backward_factor: float = 2.0  # backward costs twice the forward (two matmuls per forward one)
    grad_bytes_per_param: int = 4  # what the all-reduce carries per trainable parameter
    weight_bytes_per_param: int = 4
    state_bytes_per_param: int = 12  # gradient + Adam moments (fp32); 16 with bf16/fp16 masters
    cached_prefix: bool = False  # frozen blocks' output comes from the activation cache

    @property
    def num_blocks(self) -> int:
        return len(self.block_params)


@dataclass(frozen=True)
class Cluster:
    """The machines: how many, how they talk, what memory and time cost."""

    max_workers: int
    workers_per_node: int
    intra_node_bytes_per_second: float  # effective all-reduce bandwidth inside a node
    inter_node_bytes_per_second: float  # ... once the ring crosses nodes
    collective_latency_seconds: float = 0.0  # per all-reduce step of the ring
    worker_memory_bytes: Optional[float] = None  # None: memory never binds
    worker_price_per_hour: float = 1.0
    restart_seconds: float = 0.0  # checkpoint + relaunch, paid by a plan that changes workers
    micro_step_seconds: float = 0.0  # fixed cost of one micro-batch (kernel launches, Python)
    max_micro_batch: Optional[int] = None


@dataclass(frozen=True)
class Plan:
    workers: int
    micro_batch: int
    accumulation: int
    step_seconds: float
    memory_bytes: float
    remaining_seconds: float = 0.0  # the rest of the run under this plan, restart included
    remaining_cost: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


def allreduce_seconds(cluster: Cluster, workers: int, nbytes: float) -> float:
    """Ring all-reduce: each worker sends and receives 2(n-1)/n of the buffer over the slowest link."""
    if workers <= 1 or nbytes == 0:
        return 0.0
    bandwidth = cluster.intra_node_bytes_per_second if workers <= cluster.workers_per_node \
        else cluster.inter_node_bytes_per_second
    return 2 * (workers - 1) * (cluster.collective_latency_seconds + nbytes / workers / bandwidth)


def compute_seconds_per_example(work: Workload, frozen: int) -> float:
    frozen_fwd = 0.0 if work.cached_prefix else sum(work.block_forward_seconds[:frozen])
    trainable = sum(work.block_forward_seconds[frozen:]) + work.head_forward_seconds
    return frozen_fwd + trainable * (1 + work.backward_factor)


def trainable_params(work: Workload, frozen: int) -> int:
    return sum(work.block_params[frozen:]) + work.head_params


def step_seconds(work: Workload, cluster: Cluster, frozen: int, workers: int, micro: int, accumulation: int) -> float:
    """One optimizer step: every micro-batch's compute, then the gradient all-reduce (not overlapped:
    an upper bound that holds for DeepSpeed on CPU and roughly for small models on GPUs)."""
    compute = accumulation * (micro * compute_seconds_per_example(work, frozen) + cluster.micro_step_seconds)
    return compute + allreduce_seconds(cluster, workers, trainable_params(work, frozen) * work.grad_bytes_per_param)


def memory_bytes(work: Workload, frozen: int, micro: int) -> float:
    """All weights, training state for the trainable ones, activations of the trainable blocks."""
    weights = (sum(work.block_params) + work.head_params) * work.weight_bytes_per_param
    state = trainable_params(work, frozen) * work.state_bytes_per_param
    return weights + state + micro * sum(work.block_activation_bytes[frozen:])


def feasible_plans(work: Workload, cluster: Cluster, frozen: int) -> list[Plan]:
    """Every (workers, micro, accumulation) with workers x micro x accumulation == global batch
    that fits in memory; for each worker count the largest micro-batch that fits (fewest
    micro-steps: same compute, less fixed cost)."""
    plans = []
    for workers in range(1, cluster.max_workers + 1):
        if work.global_batch % workers:
            continue
        per_worker = work.global_batch // workers
        for micro in sorted((d for d in range(1, per_worker + 1) if per_worker % d == 0), reverse=True):
            if cluster.max_micro_batch is not None and micro > cluster.max_micro_batch:
                continue
            mem = memory_bytes(work, frozen, micro)
            if cluster.worker_memory_bytes is not None and mem > cluster.worker_memory_bytes:
                continue
            accumulation = per_worker // micro
            plans.append(Plan(workers, micro, accumulation,
                              step_seconds(work, cluster, frozen, workers, micro, accumulation), mem))
            break
    return plans


def choose_plan(mode: str, work: Workload, cluster: Cluster, frozen: int, steps_left: int, current_workers: int,
                seconds_left: Optional[float] = None) -> Plan:
    """The plan for the rest of the run at boundary ``frozen``.

    ``performance``: the least remaining time. ``efficiency``: the least remaining cost
    (worker-hours x price) among plans that finish within ``seconds_left`` (the deadline minus
    the time spent); if none can, the fastest. A plan on another worker count pays
    ``restart_seconds`` on all its workers.
    """
    if mode not in ("performance", "efficiency"):
        raise ValueError(f"packing mode must be 'performance' or 'efficiency', got {mode!r}")
    plans = feasible_plans(work, cluster, frozen)
    if not plans:
        raise ValueError(f"no plan fits: the global batch {work.global_batch} does not fit in "
                         f"{cluster.max_workers} workers' memory at {frozen} frozen blocks")
    priced = []
    for plan in plans:
        seconds = steps_left * plan.step_seconds + (cluster.restart_seconds if plan.workers != current_workers else 0)
        priced.append(replace(plan, remaining_seconds=seconds,
                              remaining_cost=seconds / 3600 * plan.workers * cluster.worker_price_per_hour))
    # Ties go to the current worker count, then to fewer workers: never move for nothing.
    tie = lambda p: (p.workers != current_workers, p.workers)  # noqa: E731
    fastest = min(priced, key=lambda p: (p.remaining_seconds, *tie(p)))
    if mode == "performance":
        return fastest
    in_time = [p for p in priced if seconds_left is None or p.remaining_seconds <= seconds_left]
    return min(in_time, key=lambda p: (p.remaining_cost, *tie(p))) if in_time else fastest


def uniform_blocks(global_batch: int, num_blocks: int, block_params: int, embedding_params: int, head_params: int,
                   example_seconds: float, activation_bytes: float, **kw) -> Workload:
    """A transformer of identical blocks: forward time splits over blocks in proportion to their
    parameters (FLOPs per token scale with them); embeddings are a lookup (no time, but their
    parameters freeze with block 0). ``example_seconds`` is one example's full forward+backward."""
    params = [block_params] * num_blocks
    params[0] += embedding_params
    backward = kw.get("backward_factor", 2.0)
    per_block = example_seconds / (1 + backward) * block_params / (num_blocks * block_params + head_params)
    head = example_seconds / (1 + backward) * head_params / (num_blocks * block_params + head_params)
    return Workload(global_batch=global_batch, block_forward_seconds=(per_block,) * num_blocks,
                    block_params=tuple(params), block_activation_bytes=(activation_bytes,) * num_blocks,
                    head_forward_seconds=head, head_params=head_params, **kw)


def calibrate(work: Workload, cluster: Cluster, frozen: int, workers: int, micro: int, accumulation: int,
              measured_step_seconds: float) -> Workload:
    """Scale the workload's compute so the model reproduces a measured step at this plan."""
    comm = allreduce_seconds(cluster, workers, trainable_params(work, frozen) * work.grad_bytes_per_param)
    fixed = accumulation * cluster.micro_step_seconds
    modelled = accumulation * micro * compute_seconds_per_example(work, frozen)
    if modelled <= 0:
        return work
    scale = max(measured_step_seconds - comm - fixed, 1e-9) / modelled
    return replace(work, block_forward_seconds=tuple(t * scale for t in work.block_forward_seconds),
                   head_forward_seconds=work.head_forward_seconds * scale)


def transformer_activation_bytes(seq_len: int, hidden: int, heads: int, element_size: int) -> float:
    """Activations one example keeps for backward in one transformer block (Korthikanti et al.
    2022, no recomputation: s*h*(34 + 5*a*s/h) bytes at 2-byte precision)."""
    return seq_len * hidden * (34 + 5 * heads * seq_len / hidden) * element_size / 2


def timeline_seconds(mode: str, work: Workload, cluster: Cluster, freezes: Sequence[tuple[int, int]],
                     total_steps: int, start_workers: int, deadline_seconds: Optional[float] = None,
                     pack: bool = True) -> dict:
    """Replay a freeze timeline ``[(step, frozen_blocks), ...]``: the run starts at ``start_workers``
    with no block frozen and, when ``pack``, re-plans at every freeze. Returns seconds, cost
    and the plans taken. ``freezes=[]`` is training without freezing."""
    per_worker = work.global_batch // start_workers
    micro = per_worker if cluster.max_micro_batch is None else min(per_worker, cluster.max_micro_batch)
    while per_worker % micro:
        micro -= 1
    plan = Plan(start_workers, micro, per_worker // micro,
                step_seconds(work, cluster, 0, start_workers, micro, per_worker // micro), memory_bytes(work, 0, micro))
    seconds = cost = 0.0
    step, frozen, segments = 0, 0, []
    for at, new_frozen in [*freezes, (total_steps, None)]:
        span = max(0, min(at, total_steps) - step)
        seconds += span * plan.step_seconds
        cost += span * plan.step_seconds / 3600 * plan.workers * cluster.worker_price_per_hour
        segments.append({"from_step": step, "frozen": frozen, **plan.as_dict()})
        step = min(at, total_steps)
        if new_frozen is None or step >= total_steps:
            break
        frozen = new_frozen
        if pack:
            left = None if deadline_seconds is None else deadline_seconds - seconds
            new = choose_plan(mode, work, cluster, frozen, total_steps - step, plan.workers, left)
            if new.workers != plan.workers:
                seconds += cluster.restart_seconds
                cost += cluster.restart_seconds / 3600 * new.workers * cluster.worker_price_per_hour
            plan = new
        else:
            plan = replace(plan, step_seconds=step_seconds(work, cluster, frozen, plan.workers, plan.micro_batch,
                                                           plan.accumulation))
    return {"seconds": seconds, "cost": cost, "segments": segments}


class Repacker:
    """The planner inside a live run (Composer-style: one object, two hooks). The launcher reports
    each optimizer step's wall time (``record_step``) and asks at each freeze (``on_freeze``);
    the workload is calibrated from the steps measured since the last freeze, the bandwidth from
    an all-reduce timed at start. Rank 0 decides and broadcasts, so all ranks act alike."""

    def __init__(self, config: "PackingConfig", model: torch.nn.Module, adapter: "ModelAdapter", global_batch: int,
                 seq_len: int, world: int, cached_prefix: bool, started_world: Optional[int] = None,
                 bandwidth: Optional[float] = None, profile_batch: Optional[dict] = None):
        self.config = config
        self.mode = config.mode.value
        self.started_world = started_world or world
        self.bandwidth = bandwidth if bandwidth is not None else measure_allreduce_bandwidth(world)
        self.work = workload_of(model, adapter, global_batch, seq_len, cached_prefix, profile_batch)
        self._step_seconds: list[float] = []

    def cluster(self, world: int) -> Cluster:
        c = self.config
        per_node = c.workers_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", self.started_world))
        intra = c.intra_node_bandwidth or self.bandwidth or float("inf")
        memory = c.worker_memory_bytes
        if memory is None and torch.cuda.is_available():
            memory = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        return Cluster(max_workers=c.max_workers or self.started_world, workers_per_node=per_node,
                       intra_node_bytes_per_second=intra, inter_node_bytes_per_second=c.inter_node_bandwidth or intra,
                       worker_memory_bytes=memory, worker_price_per_hour=c.worker_price_per_hour,
                       restart_seconds=c.restart_seconds, max_micro_batch=c.max_micro_batch)

    def record_step(self, seconds: float) -> None:
        self._step_seconds.append(seconds)

    def on_freeze(self, old_frozen: int, new_frozen: int, steps_left: int, seconds_spent: float, world: int,
                  micro: int, accumulation: int) -> Optional[Plan]:
        """The plan for the rest of the run if it differs from the current one in workers, else
        None. Collective."""
        from deepspeed import comm as dist
        measured = self._step_seconds[1:] or self._step_seconds  # the first step after a move warms up
        self._step_seconds = []
        decision = torch.zeros(3, dtype=torch.long, device=_device())  # NCCL moves device tensors only
        if dist.get_rank() == 0 and measured:
            cluster = self.cluster(world)
            self.work = calibrate(self.work, cluster, old_frozen, world, micro, accumulation,
                                  sorted(measured)[len(measured) // 2])
            left = None if self.config.deadline_seconds is None else self.config.deadline_seconds - seconds_spent
            plan = choose_plan(self.mode, self.work, cluster, new_frozen, steps_left, world, left)
            decision = torch.tensor([plan.workers, plan.micro_batch, plan.accumulation], device=decision.device)
        if dist.get_world_size() > 1:
            dist.broadcast(decision, src=0)
        workers, micro_new, accumulation_new = (int(x) for x in decision)
        if workers in (0, world):
            return None
        cluster = self.cluster(world)
        return Plan(workers, micro_new, accumulation_new,
                    step_seconds(self.work, cluster, new_frozen, workers, micro_new, accumulation_new),
                    memory_bytes(self.work, new_frozen, micro_new))


def measure_allreduce_bandwidth(world: int, nbytes: int = 16 * 2 ** 20) -> Optional[float]:
    """The bandwidth this world's all-reduce reaches (as ``allreduce_seconds`` defines it); None
    for a world of one. Collective."""
    if world <= 1:
        return None
    import time
    from deepspeed import comm as dist
    from deepspeed.accelerator import get_accelerator
    buffer = torch.zeros(nbytes // 4, dtype=torch.float32, device=_device())
    dist.all_reduce(buffer)  # connect and warm up
    get_accelerator().synchronize()
    start = time.perf_counter()
    for _ in range(3):
        dist.all_reduce(buffer)
    get_accelerator().synchronize()
    seconds = torch.tensor([(time.perf_counter() - start) / 3], device=buffer.device)
    dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
    return 2 * (world - 1) * nbytes / world / float(seconds)


def profile_forward(model: torch.nn.Module, adapter: "ModelAdapter", batch: dict) -> tuple[list[float], float]:
    """(forward seconds per example of each block, of everything else), timed on one batch."""
    import time
    spent, started, handles = [0.0] * adapter.num_blocks, {}, []
    for i, block in enumerate(adapter.blocks):
        handles.append(block.register_forward_pre_hook(lambda m, a, i=i: started.__setitem__(i, time.perf_counter())))
        handles.append(block.register_forward_hook(
            lambda m, a, o, i=i: spent.__setitem__(i, spent[i] + time.perf_counter() - started[i])))
    try:
        start = time.perf_counter()
        with torch.no_grad(), torch.random.fork_rng(devices=[]):  # the training's dropout stream is untouched
            model(**batch)
        total = time.perf_counter() - start
    finally:
        for h in handles:
            h.remove()
    n = len(next(iter(batch.values())))
    return [t / n for t in spent], max(total - sum(spent), 0.0) / n


def _device() -> torch.device:
    from deepspeed.accelerator import get_accelerator
    return torch.device(get_accelerator().current_device_name())


def workload_of(model: torch.nn.Module, adapter: "ModelAdapter", global_batch: int, seq_len: int,
                cached_prefix: bool, profile_batch: Optional[dict] = None) -> Workload:
    """The cost model's view of a Hugging Face model: blocks per the adapter, the embeddings
    freezing with block 0, activations from hidden size, heads and sequence length. Forward times
    per block are measured on ``profile_batch`` when given (else split in proportion to block
    parameters); ``calibrate`` then scales them to the measured training steps."""
    config = model.config
    hidden = next(getattr(config, n) for n in ("hidden_size", "n_embd", "d_model", "dim") if hasattr(config, n))
    heads = next(getattr(config, n) for n in ("num_attention_heads", "n_head", "n_heads") if hasattr(config, n))
    blocks = [sum(p.numel() for p in adapter.block_parameters(i)) for i in range(adapter.num_blocks)]
    frozen_prefix = sum(p.numel() for m in adapter.frozen_modules(1) for p in m.parameters())
    total = sum(p.numel() for p in model.parameters())
    element = next(model.parameters()).element_size()
    work = uniform_blocks(global_batch, adapter.num_blocks, blocks[-1], frozen_prefix - blocks[0],
                          total - frozen_prefix - sum(blocks[1:]), example_seconds=1.0,
                          activation_bytes=transformer_activation_bytes(seq_len, hidden, heads, element),
                          grad_bytes_per_param=element, weight_bytes_per_param=element,
                          state_bytes_per_param=12 if element == 4 else 16, cached_prefix=cached_prefix)
    if profile_batch is None:
        return work
    per_block, rest = profile_forward(model, adapter, profile_batch)
    return replace(work, block_forward_seconds=tuple(per_block), head_forward_seconds=rest)
