"""Per-block statistics the deciders read, gathered where they are cheap.

- Gradient moments (``GradientMoments``): over the optimizer steps of a decision interval, per
  block b, A_b = sum_t g_b(t) (a vector) and Q_b = sum_t ||g_b(t)||^2, where g(t) is the global-batch
  gradient exactly as the optimizer consumes it: read in a step pre-hook of the inner torch
  optimizer, so it is reduced over ranks, unscaled (a loss-scale change moves nothing; an overflow
  step that DeepSpeed skips is not counted) and clipped. Each rank sums only the elements it holds
  (``OptimizerLayout.owned_fragments``): 4 bytes per trainable parameter / world size. A decision
  all-reduces four floats per block: ||A_b||^2, Q_b, the L1 norm of A_b (the paper's statistic) and
  the step count.
- Adam's moments (``adam_moments``): per block sum(m^2) and sum(v), bias-corrected, read from the
  optimizer state at a decision; no memory of its own.
- The recent gradient scale (``GradientMoments`` with ``scale_decay``): per block the mean of
  ||g_b(t)||^2 weighted as the noise in Adam's first moment is, b1^(2i) for the gradient i steps
  back: the noise floor of sum(m^2) when the gradient scale changes, which sum(v) (b2 = 0.999: on a
  fine-tuning run the whole run's average) is not. A float per block, added up in the same hook.
- Output drift on a probe set (``ProbeDrift``): each block's output on fixed training examples
  (eval mode, sharded over the ranks), projected to a few dimensions, against the previous decision's.
- Each update's first-order progress (``UpdateProgress``): per block and step, -g_b(t+1) . dtheta_b(t),
  what Adam's update of the block at step t did to the training loss as the next batch measures it,
  read at the step's end point: the decrease minus half the curvature along the step. A float per
  block and step of the interval; no decider reads it (docs/deciders.md: rejected as a rule).

With a ``history`` of h (watch runs, ``log_statistics``), the last h intervals' gradient sums and
probe outputs are kept too, and each interval also logs <A_b, A_b'> with each of them and the drift
since each: intervals merged after the fact (``BlockStats.merge``) then get exactly the statistics
one longer interval would have measured.

From A and Q, with K steps, the per-step signal and noise of block b are estimated without bias
(for independent steps with a common mean mu and noise covariance C):
E||A||^2 = K^2 ||mu||^2 + K tr C and E[Q] = K ||mu||^2 + K tr C, so
signal = (||A||^2 - Q) / (K (K - 1)) estimates ||mu||^2 and noise = (Q - ||A||^2 / K) / (K - 1) tr C.
Logged intervals merge (``BlockStats.merge``), so watch runs replay at multiples of their interval.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, Optional, Sequence

import torch
from deepspeed import comm as dist

from .model_adapter import ModelAdapter
from .repartition import Fragment, OptimizerLayout

_CHUNK = 1 << 20  # elements per partial sum (a 4 MB temporary where the op makes one)
_FUSED_DEVICES = ("cuda",)  # where _chunk_sums reduces all chunks in one fused op
_PROJECTION_DIM = 32  # random projection of each token's hidden state for the drift statistic
# Adam's first step leaves m^2 / v = 1 whatever the gradient: its ratio estimates from the second on.
ADAM_FIRST_ESTIMATE = 2


@dataclass
class BlockStats:
    """One decision interval's statistics, combined over ranks; per block, None where not measured
    (frozen blocks, or a statistic not collected)."""
    step: int
    """Optimizer step at the end of the interval."""
    steps: int
    """Optimizer steps the gradient sums cover (K)."""
    grad_l1: list[Optional[float]] = field(default_factory=list)
    """L1 norm of the summed gradient (the paper's statistic)."""
    grad_sum_sq: list[Optional[float]] = field(default_factory=list)
    """||A_b||^2: squared norm of the summed gradient."""
    grad_sq_sum: list[Optional[float]] = field(default_factory=list)
    """Q_b: sum over steps of the squared gradient norm."""
    adam_m2: Optional[list[Optional[float]]] = None
    """sum of the bias-corrected first moment squared."""
    adam_v: Optional[list[Optional[float]]] = None
    """sum of the bias-corrected second moment."""
    adam_beta1: Optional[float] = None
    """Adam's beta1 (sets the first moment's averaging window)."""
    adam_step: Optional[int] = None
    """Adam's step count t (its bias correction: how many gradients the first moment averages)."""
    grad_sq_recent: Optional[list[Optional[float]]] = None
    """sum_i b1^(2i) ||g_b(t - i)||^2 / sum_i b1^(2i): the squared gradient norm over the steps Adam's
    first moment averages, weighted as their noise is in it."""
    drift: Optional[list[Optional[float]]] = None
    """||H_b(t) - H_b(prev)|| / ||H_b(t)|| of the block's output on the probe set."""
    grad_dots: Optional[list[Optional[list[float]]]] = None
    """With a history: per block, <A_b, A_b of the interval j + 1 before> for j = 0, 1, ..."""
    drift_back: Optional[list[Optional[list[float]]]] = None
    """With a history: per block, the drift since the probe measurement j + 1 before this one
    (j = 0 is ``drift``)."""
    progress: Optional[list[Optional[list[float]]]] = None
    """Per block, per update of the interval: -g_b(t+1) . dtheta_b(t), the training loss's first-order
    decrease owed to the block's update at step t (``UpdateProgress``)."""
    progress_rest: Optional[list[float]] = None
    """The same for the trainable parameters outside the blocks (embeddings, task head)."""
    lr: Optional[float] = None
    """Learning rate of the interval's last step (first param group)."""
    future_lr_sum: Optional[float] = None
    """Sum of the learning rates of the steps still to run."""
    future_lr_sq_sum: Optional[float] = None
    """Sum of their squares."""

    def signal(self, block: int) -> Optional[float]:
        """Unbiased estimate of ||mu_b||^2, the squared mean per-step gradient (may be negative)."""
        a2, q, k = self.grad_sum_sq[block], self.grad_sq_sum[block], self.steps
        return None if a2 is None or q is None or k < 2 else (a2 - q) / (k * (k - 1))

    def noise(self, block: int) -> Optional[float]:
        """Unbiased estimate of tr C_b, the per-step gradient noise variance."""
        a2, q, k = self.grad_sum_sq[block], self.grad_sq_sum[block], self.steps
        return None if a2 is None or q is None or k < 2 else (q - a2 / k) / (k - 1)

    def adam_snr(self, block: int, reference: str = "v") -> Optional[float]:
        """Per-step signal-to-noise ratio from Adam's moments: E[m^2] ~ ||mu||^2 + c_t tr C and
        E[v] ~ ||mu||^2 + tr C, so rho = sum m^2 / sum v gives snr = (rho - c_t) / (1 - rho). The
        bias-corrected m averages t gradients with weights proportional to b1^i, which keep
        c_t = c (1 + b1^t) / (1 - b1^t) of their noise, c = (1 - b1) / (1 + b1): 3.9 c at step 5,
        within 5% of c only after 35 steps, so the early reads a constant c would take for signal.
        None at step 1, where m^2 and v are the same gradient's.

        E[v] ~ ||mu||^2 + tr C holds only while the gradient scale stays put: v averages the whole
        run (b2 = 0.999), m^2's noise the last few steps, so a rising scale reads as signal and a
        falling one below zero. ``reference`` "recent" divides by ``grad_sq_recent`` instead, the
        squared gradient norm weighted as m^2's noise is, which has that expectation at any scale."""
        den = self.adam_v if reference == "v" else self.grad_sq_recent
        if self.adam_m2 is None or den is None or self.adam_m2[block] is None or not den[block] \
                or self.adam_step is None or self.adam_step < ADAM_FIRST_ESTIMATE:
            return None
        b1, t = self.adam_beta1, self.adam_step
        rho, c = self.adam_m2[block] / den[block], (1 - b1) / (1 + b1) * (1 + b1 ** t) / (1 - b1 ** t)
        return (rho - c) / (1 - rho) if rho < 1 else math.inf

    def future_steps(self) -> Optional[float]:
        """Effective number of independent steps left: (sum lr)^2 / sum lr^2 over the rest of the
        run. The summed future update's signal-to-noise ratio is this times the per-step one."""
        if not self.future_lr_sq_sum:
            return None
        return self.future_lr_sum ** 2 / self.future_lr_sq_sum

    def to_json(self) -> dict[str, Any]:
        return {k: (_round(v) if k not in ("step", "steps") else v) for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> "BlockStats":
        return cls(**{f.name: record[f.name] for f in fields(cls) if f.name in record})

    @classmethod
    def merge(cls, parts: Sequence["BlockStats"]) -> "BlockStats":
        """Consecutive intervals as one, exactly: ||sum_i A_i||^2 from each part's ||A_i||^2 and its
        logged dot products with the earlier parts (``grad_dots``), Q and K add up, and the drift over
        the whole is the last part's drift since the first part's start (``drift_back``). The last
        part's point-in-time fields (step, learning rates, Adam's moments, the recent gradient scale)
        are kept; the L1 norm is not composable and is dropped; the per-update progress is the parts'
        in order. Parts need a history as long as there are parts after the first."""
        if len(parts) == 1:
            return parts[0]
        last, blocks, m = parts[-1], len(parts[-1].grad_sum_sq), len(parts)
        if any(p.grad_dots is None or len(p.grad_dots) != blocks for p in parts[1:]):
            raise ValueError("merging intervals needs their grad_dots (a run with log_statistics)")
        a2: list[Optional[float]] = []
        for b in range(blocks):
            values = [p.grad_sum_sq[b] for p in parts]
            dots = [p.grad_dots[b] for p in parts[1:]]
            if any(v is None for v in values) or any(d is None or len(d) < i + 1 for i, d in enumerate(dots)):
                a2.append(None)
                continue
            cross = sum(dots[i][j] for i in range(m - 1) for j in range(i + 1))  # part i+1 with each before it
            a2.append(sum(values) + 2 * cross)
        q = [None if any(p.grad_sq_sum[b] is None for p in parts) else sum(p.grad_sq_sum[b] for p in parts)
             for b in range(blocks)]
        drift = None
        if last.drift_back is not None:
            drift = [None if d is None or len(d) < m else d[m - 1] for d in last.drift_back]
        progress = rest = None
        if all(p.progress is not None for p in parts):
            progress = [None if any(p.progress[b] is None for p in parts) else [v for p in parts for v in p.progress[b]]
                        for b in range(blocks)]
            rest = [v for p in parts for v in p.progress_rest or []]
        return cls(step=last.step, steps=sum(p.steps for p in parts), grad_l1=[None] * blocks, grad_sum_sq=a2,
                   grad_sq_sum=q, adam_m2=last.adam_m2, adam_v=last.adam_v, adam_beta1=last.adam_beta1,
                   adam_step=last.adam_step, grad_sq_recent=last.grad_sq_recent,
                   drift=drift, progress=progress, progress_rest=rest, lr=last.lr, future_lr_sum=last.future_lr_sum,
                   future_lr_sq_sum=last.future_lr_sq_sum)


def _round(value: Any) -> Any:
    if isinstance(value, list):
        return [_round(v) for v in value]
    if isinstance(value, float):
        return float(f"{value:.6g}") if math.isfinite(value) else None
    return value


class GradientMoments:
    """What a step pre-hook of the inner optimizer reads from each gradient it consumes (module doc):
    A_b and Q_b per block over the optimizer steps since the last ``collect`` (``sums``), and the
    recent gradient scale, an average of ||g_b||^2 that decays by ``scale_decay`` per step."""

    def __init__(self, layout: OptimizerLayout, block_of: dict[int, int], num_blocks: int, history: int = 0,
                 sums: bool = True, scale_decay: Optional[float] = None):
        self.num_blocks, self.history, self.scale_decay = num_blocks, history, scale_decay
        self._past: list[list[torch.Tensor]] = []  # the last ``history`` intervals' A_b, newest first
        frags = [f for f in layout.owned_fragments() if id(f.param) in block_of]
        device = frags[0].tensor.device if frags else torch.device("cpu")
        sizes = [0] * num_blocks
        for f in frags:
            sizes[block_of[id(f.param)]] += f.numel
        # A_b: a float per owned block element, only where the sums are wanted.
        self._sums = [torch.zeros(n if sums else 0, dtype=torch.float32, device=device) for n in sizes]
        self._sq = torch.zeros(num_blocks, dtype=torch.float64, device=device)  # Q_b
        # The recent scale: the decayed sum of ||g_b||^2 and (the same on every rank) the decayed
        # count of steps, whose ratio is the average.
        self._scale = torch.zeros(num_blocks, dtype=torch.float64, device=device)
        self._scale_weight = 0.0
        self._stepped = False
        self._measured = [n > 0 for n in sizes]
        # Per optimizer tensor: (block, fragment, this fragment's view of A_b).
        self._segments: dict[int, list[tuple[int, Fragment, Optional[torch.Tensor]]]] = {}
        used = [0] * num_blocks
        for f in frags:
            b = block_of[id(f.param)]
            view = self._sums[b][used[b]:used[b] + f.numel] if sums else None
            self._segments.setdefault(id(f.tensor), []).append((b, f, view))
            used[b] += f.numel
        # Per set of tensors a hook call steps: its segments, their A_b views and the matrix that sums
        # their chunks into blocks (built once: a host-to-device copy each step would stall a GPU).
        self._plans: dict[tuple[int, ...], tuple[list[Fragment], list[torch.Tensor], torch.Tensor]] = {}
        self._steps: dict[int, int] = {}  # per optimizer tensor: steps seen (ZeRO steps one group at a time)
        self._handle = layout.inner.register_step_pre_hook(self._on_step)

    def _on_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        # Every rank's inner optimizer steps on every step DeepSpeed does not skip, whether or not
        # its partition holds block elements: the scale's step count stays the same on all ranks.
        # ZeRO may step one parameter group at a time: the scale decays at the step's first call.
        if not self._stepped and self.scale_decay is not None:
            self._scale.mul_(self.scale_decay)
            self._scale_weight = self.scale_decay * self._scale_weight + 1.0
        self._stepped = True
        tensors = [t for group in optimizer.param_groups for t in group["params"]
                   if id(t) in self._segments and t.grad is not None]
        if not tensors:
            return
        for t in tensors:
            self._steps[id(t)] = self._steps.get(id(t), 0) + 1
        key = tuple(map(id, tensors))
        if key not in self._plans:
            segments = [s for t in tensors for s in self._segments[id(t)]]
            self._plans[key] = ([f for _, f, _ in segments], [acc for _, _, acc in segments if acc is not None],
                                _summing_matrix(_per_chunk([f.numel for _, f, _ in segments],
                                                            [b for b, _, _ in segments]), self.num_blocks,
                                                self._sq.device))
        frags, accs, matrix = self._plans[key]
        grads = [f.view(f.tensor.grad).float() for f in frags]
        # On a GPU each tensor op is a kernel launch: a few per step on CUDA (one per parameter tensor
        # elsewhere), where this hook once issued six per parameter tensor.
        if accs:
            torch._foreach_add_(accs, grads)
        sq = matrix @ _chunk_sums(grads, "squares")
        self._sq += sq
        if self.scale_decay is not None:
            self._scale += sq

    def advance(self) -> None:
        """End of an optimizer step (called after every one): the next hook call starts a new step of
        the recent scale. A step DeepSpeed skipped (overflow) never reached the hook and neither
        decays nor adds to it, as it does nothing to Adam's moments."""
        self._stepped = False

    def recent_scale(self, measured: Sequence[bool]) -> Optional[list[Optional[float]]]:
        """Per block the recent gradient scale (``BlockStats.grad_sq_recent``), summed over ranks;
        None before the first step or without ``scale_decay``."""
        if self.scale_decay is None:
            return None
        local = self._scale.clone()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(local)
        if not self._scale_weight:
            return None
        return [v / self._scale_weight if measured[b] else None for b, v in enumerate(local.tolist())]

    def scale_state(self) -> dict[str, Any]:
        """The recent scale, to carry over to the hook of the optimizer that replaces this one: a sum
        over ranks of fixed past values, so it stays exact whatever partition each rank then holds."""
        return {"scale": self._scale.to("cpu", copy=True), "scale_weight": self._scale_weight,
                "scale_decay": self.scale_decay}

    def load_scale(self, state: dict[str, Any]) -> None:
        if self.scale_decay is not None and state.get("scale_decay") == self.scale_decay:
            self._scale.copy_(state["scale"])
            self._scale_weight = float(state["scale_weight"])

    def collect(self, measured: Sequence[bool]) -> tuple[int, list, list, list, Optional[list]]:
        """(K, L1(A_b), ||A_b||^2, Q_b, dot products with the kept past A_b (or None)) summed over
        ranks, for the blocks in ``measured``; resets."""
        steps = max(self._steps.values(), default=0)
        n, h = self.num_blocks, self.history
        local = torch.zeros(3 * n + n * h + 1, dtype=torch.float64, device=self._sq.device)
        held = [b for b, acc in enumerate(self._sums) if acc.numel()]
        if held:
            accs = [self._sums[b] for b in held]
            matrix = _summing_matrix(_per_chunk([acc.numel() for acc in accs], held), n, local.device)
            local[:n] = matrix @ _chunk_sums(accs, "abs")
            local[n:2 * n] = matrix @ _chunk_sums(accs, "squares")
        for b in held:
            for j, past in enumerate(self._past):
                local[3 * n + b * h + j] = torch.dot(self._sums[b], past[b]).double()
        local[2 * n:3 * n] = self._sq
        local[-1] = steps
        if dist.is_initialized() and dist.get_world_size() > 1:
            # Partitions are disjoint: sums over ranks are the full-tensor values. Ranks whose
            # partition holds none of a parameter group still step it, so K is the max.
            counts = local[-1:].clone()
            dist.all_reduce(local)
            dist.all_reduce(counts, op=dist.ReduceOp.MAX)
            local[-1] = counts[0]
        values = local.tolist()
        kept = len(self._past)
        if h:
            self._past = [[acc.clone() for acc in self._sums], *self._past][:h]
        self.reset()

        def pick(offset: int) -> list[Optional[float]]:
            return [values[offset + b] if measured[b] else None for b in range(n)]

        dots = [values[3 * n + b * h:3 * n + b * h + kept] if measured[b] else None
                for b in range(n)] if h else None
        return int(values[-1]), pick(0), pick(n), pick(2 * n), dots

    def reset(self) -> None:
        for acc in self._sums:
            acc.zero_()
        self._sq.zero_()
        self._steps.clear()

    def state_dict(self) -> dict[str, Any]:
        return {"sums": [s.to("cpu", copy=True) for s in self._sums], "sq": self._sq.to("cpu", copy=True),
                "steps": dict(self._steps), **self.scale_state()}

    def load_state_dict(self, state: dict[str, Any]) -> bool:
        """Restore this rank's partial sums; False (sums and scale left at zero) if the saved layout differs."""
        if [s.numel() for s in state["sums"]] != [s.numel() for s in self._sums]:
            return False
        for acc, saved in zip(self._sums, state["sums"]):
            acc.copy_(saved)
        self._sq.copy_(state["sq"])
        self.load_scale(state)  # saved by code from before the recent scale: it starts over
        steps = max(state["steps"].values(), default=0)
        self._steps = {key: steps for key in self._segments}
        return True

    def close(self) -> None:
        self._handle.remove()

    def nbytes(self) -> int:
        tensors = [*self._sums, *(t for past in self._past for t in past)]
        return sum(t.numel() * t.element_size() for t in [*tensors, self._sq, self._scale])


class UpdateProgress:
    """What each optimizer update did to the training loss, per block, to first order (module doc).

    In the pre-hook of step t + 1 the inner optimizer still holds what its step t left: Adam's moments
    and step count, and (kept from the previous call) the rate and weight decay that step used. Its
    update was dtheta = -lr m / (1 - b1^t) / (sqrt(v / (1 - b2^t)) + eps), minus lr wd theta where the
    decay is decoupled, so -g(t+1) . dtheta is read from tensors that exist anyway: no copy of the
    parameters. g(t+1) is the next batch's gradient, whose noise is independent of the update, so the
    product's mean is the update's first-order effect on the expected loss; g(t) would be biased by
    the noise it put into m. theta(t) in the decay term is read as theta(t+1): a second-order error.
    Clipping scales g(t+1) alike for every block (shares stay put). Each rank adds up the elements it
    holds into a float per block, and one for the trainable parameters outside the blocks, per step;
    a decision all-reduces the interval's steps. The interval's rows and the last update rules are
    saved with a checkpoint (``state_dict``); the update right after a freeze, which rebuilds the
    optimizer, is not measured, and the interval says so by its length."""

    def __init__(self, layout: OptimizerLayout, block_of: dict[int, int], num_blocks: int):
        self.num_blocks = num_blocks
        frags = layout.owned_fragments()
        device = frags[0].tensor.device if frags else torch.device("cpu")
        self._segments: dict[int, list[tuple[int, Fragment]]] = {}  # per optimizer tensor: (row, fragment)
        for f in frags:
            self._segments.setdefault(id(f.tensor), []).append((block_of.get(id(f.param), num_blocks), f))
        self._rules: dict[int, tuple] = {}  # per optimizer tensor: the update rule of its last step
        self._order = [id(t) for group in layout.inner.param_groups for t in group["params"] if id(t) in self._segments]
        self._matrices: dict[tuple[int, ...], torch.Tensor] = {}  # per set of tensors stepped: chunk -> row
        self._current = torch.zeros(num_blocks + 1, dtype=torch.float64, device=device)
        self._rows: list[torch.Tensor] = []  # the interval's finished steps
        # Rows are pushed on a condition every rank shares (the step ran, and one ran before it since
        # this optimizer was bound), so the ranks' row counts agree for the all-reduce.
        self._stepped = self._started = False
        self._handle = layout.inner.register_step_pre_hook(self._on_step)

    def _on_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._stepped = True
        stepped = [(t, group) for group in optimizer.param_groups for t in group["params"]
                   if id(t) in self._segments and t.grad is not None]
        ready = [(t, self._rules[id(t)]) for t, _ in stepped
                 if id(t) in self._rules and "exp_avg" in optimizer.state.get(t, {})]
        for t, group in stepped:
            self._rules[id(t)] = _update_rule(optimizer, group)
        if not ready:
            return
        states = [optimizer.state[t] for t, _ in ready]
        rows, values = [], []
        for (t, (lr, b1, b2, eps, wd, decoupled, corrected, amsgrad)), st, n in zip(ready, states, _adam_steps(states)):
            c1, c2 = (1 - b1 ** n, math.sqrt(1 - b2 ** n)) if corrected else (1.0, 1.0)
            second = st["max_exp_avg_sq"] if amsgrad else st["exp_avg_sq"]
            for row, f in self._segments[id(t)]:
                chunks = [f.view(x).split(_CHUNK) for x in (t.grad, st["exp_avg"], second, t.detach())]
                for g, m, v, p in zip(*chunks):
                    g = g.float()
                    value = torch.dot(g, m / v.sqrt().div_(c2).add_(eps)) * (lr / c1)
                    if decoupled and wd:
                        value = value + torch.dot(g, p.float()) * (lr * wd)
                    rows.append(row)
                    values.append(value)
        key = tuple(id(t) for t, _ in ready)
        if key not in self._matrices:  # built once per set: a host-to-device copy each step would stall a GPU
            self._matrices[key] = _summing_matrix(rows, self.num_blocks + 1, self._current.device)
        self._current += self._matrices[key] @ torch.stack(values).double()

    def advance(self) -> None:
        """End of an optimizer step: its row (the previous update's progress) joins the interval."""
        if self._stepped:
            if self._started:
                self._rows.append(self._current.clone())
            self._started = True
            self._current.zero_()
        self._stepped = False

    def collect(self, measured: Sequence[bool]) -> tuple[list[Optional[list[float]]], list[float]]:
        """(per block in ``measured``, the interval's per-update progress; the same outside the
        blocks), summed over ranks; starts a new interval."""
        n = self.num_blocks
        if not self._rows:
            return [[] if measured[b] else None for b in range(n)], []
        local = torch.stack(self._rows)
        self._rows = []
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(local)
        values = local.t().tolist()
        return [values[b] if measured[b] else None for b in range(n)], values[n]

    def state_dict(self) -> dict[str, Any]:
        """The interval's rows so far and the rule each tensor last stepped with, in the optimizer's
        order (a run resumed on the same world size holds the same elements in the same tensors)."""
        rows = torch.stack(self._rows) if self._rows else self._current.new_zeros(0, self.num_blocks + 1)
        return {"progress_rows": rows.cpu(), "progress_started": self._started,
                "progress_rules": [list(self._rules.get(key, ())) for key in self._order]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the saved interval; a state from another layout (or from before progress was
        measured) is ignored: the interval then covers the updates since."""
        if len(state.get("progress_rules", ())) != len(self._order) \
                or state["progress_rows"].shape[1:] != self._current.shape:
            return
        self._rows = list(state["progress_rows"].to(self._current.device))
        self._rules = {key: tuple(rule) for key, rule in zip(self._order, state["progress_rules"]) if rule}
        self._started = bool(state["progress_started"])

    def nbytes(self) -> int:
        return self._current.element_size() * self._current.numel() * (len(self._rows) + 1)

    def close(self) -> None:
        self._handle.remove()


def _update_rule(optimizer: torch.optim.Optimizer, group: dict) -> tuple:
    """(lr, b1, b2, eps, weight decay, decoupled, bias-corrected, amsgrad) of an Adam-type step of
    ``group``: torch's Adam and AdamW say in the group whether the decay is decoupled, DeepSpeed's
    fused and CPU Adam on the optimizer (``adam_w_mode``), and only they may turn bias correction off."""
    b1, b2 = group["betas"]
    decoupled = group.get("decoupled_weight_decay",
                          isinstance(optimizer, torch.optim.AdamW) or bool(getattr(optimizer, "adam_w_mode", False)))
    return (float(group["lr"]), float(b1), float(b2), float(group["eps"]), float(group.get("weight_decay", 0.0)),
            bool(decoupled), bool(group.get("bias_correction", True)), bool(group.get("amsgrad", False)))


def _adam_steps(states: Sequence[dict]) -> list[float]:
    """Adam's step count per state, read in one op: torch's Adam keeps each as a tensor (fused Adam on
    the device, where a ``float()`` each would synchronize once per parameter)."""
    steps = [st.get("step", 1) for st in states]
    if all(torch.is_tensor(t) for t in steps) and len({t.device for t in steps}) == 1:
        return torch.stack([t.reshape(()).float() for t in steps]).tolist()
    return [float(t) for t in steps]


def _chunk_sums(tensors: Sequence[torch.Tensor], of: Literal["squares", "abs", "values"]) -> torch.Tensor:
    """float64 vector of each chunk's sum of squares, of absolute values, or of values (for tensors
    that are never negative) over every tensor's chunks of ``_CHUNK`` elements, in order
    (``_per_chunk`` says which chunk is whose); the caller adds the chunks' values in float64. Not a
    float64 cast: of the whole tensor it is a copy at twice its size (an embedding's was the peak of a
    100M model's freeze), and even chunk by chunk it ran at 5 ns an element on CPU (2.4 s of a 300M
    freeze's pause).

    On CUDA one fused ``_foreach_norm`` over all chunks (torch's own gradient clipping relies on its
    float32 tree sums); elsewhere a dot or a sum per chunk (torch's cascade sum: relative error about
    1e-8 here), as the CPU's ``_foreach_norm`` adds in float32 in order (1e-3 off over 4M elements)."""
    chunks = [c for t in tensors for c in t.reshape(-1).split(_CHUNK)]
    if chunks[0].device.type in _FUSED_DEVICES:
        norms = torch.stack(torch._foreach_norm(chunks, 2 if of == "squares" else 1)).double()
        return norms.square() if of == "squares" else norms
    reduce = {"squares": lambda c: torch.dot(c, c), "abs": lambda c: c.abs().sum(), "values": torch.sum}[of]
    return torch.stack([reduce(c) for c in chunks]).double()


def _per_chunk(numels: Sequence[int], values: Sequence[Any]) -> list[Any]:
    """Each tensor's value (its block, its Adam step) once for each chunk ``_chunk_sums`` makes of it."""
    return [value for n, value in zip(numels, values) for _ in range(max(1, -(-n // _CHUNK)))]


def _summing_matrix(rows: Sequence[int], num_rows: int, device: torch.device,
                    weights: Optional[Sequence[float]] = None) -> torch.Tensor:
    """(num_rows, len(rows)) float64 with ``weights`` (or 1) at (rows[j], j): times a vector of
    per-chunk values, the per-row sums, in one op and in a fixed order (a GPU's index_add_ adds in
    whatever order its atomics land)."""
    matrix = torch.zeros(num_rows, len(rows), dtype=torch.float64)
    matrix[list(rows), list(range(len(rows)))] = torch.tensor(weights, dtype=torch.float64) if weights else 1.0
    return matrix.to(device)


def adam_moments(layout: OptimizerLayout, block_of: dict[int, int], num_blocks: int, measured: Sequence[bool]
                 ) -> tuple[Optional[list], Optional[list], Optional[float], Optional[int]]:
    """Per block, sum of exp_avg^2 and of exp_avg_sq, each bias-corrected, summed over ranks; beta1
    and Adam's step count; all None for optimizers without Adam's moments (or before their first step)."""
    inner = layout.inner
    frags = [f for f in layout.owned_fragments() if id(f.param) in block_of]
    device = frags[0].tensor.device if frags else torch.device("cpu")
    states = [inner.state.get(f.tensor) or {} for f in frags]
    has_state = all("exp_avg" in st and "exp_avg_sq" in st for st in states)
    betas = inner.param_groups[0].get("betas", (0.9, 0.999))
    # Per block the two sums; then: ranks with state, and the step count summed over the ranks that
    # hold a fragment, and their number (every parameter steps together, so ranks agree on it).
    local = torch.zeros(2 * num_blocks + 3, dtype=torch.float64, device=device)
    local[-3] = 1.0 if has_state else 0.0
    if has_state and frags:
        steps = _adam_steps(states)
        numels = [f.numel for f in frags]
        rows, chunk_steps = _per_chunk(numels, [block_of[id(f.param)] for f in frags]), _per_chunk(numels, steps)
        ms = [f.view(st["exp_avg"]).float() for f, st in zip(frags, states)]
        vs = [f.view(st["exp_avg_sq"]).float() for f, st in zip(frags, states)]
        # The bias corrections ride in the summing matrices: a few ops per read, not a few per parameter.
        local[:num_blocks] = _summing_matrix(rows, num_blocks, device, [(1 - betas[0] ** t) ** -2 for t in chunk_steps]
                                             ) @ _chunk_sums(ms, "squares")
        local[num_blocks:2 * num_blocks] = _summing_matrix(rows, num_blocks, device,
                                                           [1 / (1 - betas[1] ** t) for t in chunk_steps]
                                                           ) @ _chunk_sums(vs, "values")
        local[-2], local[-1] = steps[-1], 1.0
    world = 1
    if dist.is_initialized() and dist.get_world_size() > 1:
        world = dist.get_world_size()
        dist.all_reduce(local)
    values = local.tolist()
    if values[-3] != world:  # some rank has no Adam state yet
        return None, None, None, None
    return ([values[b] if measured[b] else None for b in range(num_blocks)],
            [values[num_blocks + b] if measured[b] else None for b in range(num_blocks)], float(betas[0]),
            round(values[-2] / values[-1]) if values[-1] else None)


class ProbeDrift:
    """Each block's output on a fixed probe batch (this rank's shard), against earlier measurements.

    The outputs are taken in eval mode without gradients, at unmasked positions only, and projected
    by a fixed random matrix to a few dimensions per token (norms of differences survive a random
    projection up to a few percent, and the stored references stay small). Encoder-decoder models
    run their encoder only: the blocks are the encoder's."""

    def __init__(self, adapter: ModelAdapter, probe: dict[str, torch.Tensor], history: int = 0):
        self.adapter, self.probe, self.history = adapter, probe, history
        self._past: list[list[Optional[torch.Tensor]]] = []  # earlier projected outputs, newest first
        self._projection: Optional[torch.Tensor] = None

    @torch.no_grad()
    def measure(self, measured: Sequence[bool]) -> tuple[list[Optional[float]], Optional[list]]:
        """(drift since the last measurement, drifts since each kept earlier one (None without a
        history)) per block, None for blocks not in ``measured`` or without an earlier measurement."""
        n = self.adapter.num_blocks
        outputs: list[Optional[torch.Tensor]] = [None] * n
        mask = self.probe.get("attention_mask")
        keep = mask.reshape(-1).bool() if mask is not None else None

        def grab(index: int):
            def hook(_module, _args, output):
                hidden = output[0] if isinstance(output, tuple) else output
                flat = hidden.reshape(-1, hidden.shape[-1]).float()
                if keep is not None and keep.numel() == flat.shape[0]:
                    flat = flat[keep]
                if self._projection is None:
                    g = torch.Generator(device="cpu").manual_seed(0)
                    self._projection = (torch.randn(flat.shape[-1], _PROJECTION_DIM, generator=g)
                                        / math.sqrt(_PROJECTION_DIM)).to(flat.device)
                outputs[index] = flat @ self._projection
            return hook

        model = self.adapter.model
        encoder_only = getattr(model.config, "is_encoder_decoder", False)
        run = model.get_encoder() if encoder_only else model
        inputs = {k: v for k, v in self.probe.items() if not encoder_only or k in ("input_ids", "attention_mask")}
        handles = [blk.register_forward_hook(grab(i)) for i, blk in enumerate(self.adapter.blocks)]
        was_training = model.training
        model.eval()
        try:
            run(**inputs)
        finally:
            for h in handles:
                h.remove()
            model.train(was_training)
        pasts = self._past
        self._past = [outputs, *pasts][:max(1, self.history + 1)]
        # The squared norms stay on the device until one read: an item() each synchronized a GPU
        # once per block and kept measurement.
        index, norms = [], []
        for b, cur in enumerate(outputs):
            if cur is None or not measured[b]:
                continue
            index.append(b)
            norms.append(cur.double().pow(2).sum())
            for j, past in enumerate(pasts):
                if past[b] is not None:
                    index.append(n * (j + 1) + b)
                    norms.append((cur - past[b]).double().pow(2).sum())
        device = next(iter(self.probe.values())).device
        local = torch.zeros(n * (len(pasts) + 1), dtype=torch.float64, device=device)
        if norms:
            local[index] = torch.stack(norms).to(device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(local)
        values = local.tolist()

        def drift(b: int, j: int) -> Optional[float]:
            return math.sqrt(values[n * (j + 1) + b] / values[b]) if measured[b] and values[b] > 0 else None

        latest = [drift(b, 0) if pasts else None for b in range(n)]
        back = [[drift(b, j) for j in range(len(pasts))] if measured[b] else None for b in range(n)] \
            if self.history else None
        return latest, back


def lr_at(scheduler: Any, optimizer: Any, step: int) -> Optional[float]:
    """The learning rate (first param group) the scheduler gives optimizer step ``step`` (1-based),
    computed without stepping it: DeepSpeed's schedulers from ``last_batch_iteration``, torch's
    LambdaLR from its lambdas. None when the scheduler is of another kind."""
    if scheduler is None:
        return float(optimizer.param_groups[0]["lr"])
    if hasattr(scheduler, "last_batch_iteration") and hasattr(scheduler, "get_lr"):
        saved = scheduler.last_batch_iteration
        scheduler.last_batch_iteration = step - 1
        try:
            return float(scheduler.get_lr()[0])
        finally:
            scheduler.last_batch_iteration = saved
    if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        return float(scheduler.base_lrs[0] * scheduler.lr_lambdas[0](step - 1))
    return None
