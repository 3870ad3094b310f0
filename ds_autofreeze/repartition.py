"""The one module that touches DeepSpeed's internals: optimizer layout, rebuild, state carry, resharding.

``check_engine`` probes, when AutoFreeze attaches, every private name used here and the layout of
the engine's optimizer, and refuses there with one error naming what is missing or unsupported:
never at the first freeze, hours in. Two shortcuts of a rebuild, ``_flatten_in_place`` and
``_no_full_collection``, only speed it up and are not probed: where DeepSpeed lacks what they
patch, its own path runs.

``OptimizerLayout`` names, for every trainable parameter, the fragments of it this rank's optimizer
steps: elements ``[start, start + numel)`` of the flattened parameter are elements
``[offset, offset + numel)`` of ``tensor``, a tensor the inner torch optimizer holds (ZeRO's flat
fp32 partition, a per-parameter fp32 master, or the parameter itself). Its optimizer moments are
the same range of ``inner.state[tensor][key]``, and while the inner optimizer steps, its gradient is
the same range of ``tensor.grad``: the global-batch gradient, reduced, unscaled and clipped.

Layouts (the wrapper ``deepspeed.initialize`` built, by what it holds):
- ``torch``: no wrapper (fp32, ZeRO-0): the inner optimizer steps the parameters themselves.
- ``unfused``: DeepSpeed's unfused fp16/bf16 wrapper (ZeRO-0): one fp32 master per parameter.
- ``flat``: ZeRO-1/2 and the bf16 optimizer: one flat fp32 partition per param group and rank;
  each parameter knows its fragment in it (``param._hp_mapping``).
- ``zero3``: ZeRO-3: one flat fp32 partition per sub-group; every parameter is split evenly over
  the ranks (rank r holds elements [r * p, (r + 1) * p) of it), placed at ``grad_position``.
The first two are replicated (every rank holds all of it); the others partitioned.

``Repartitioner.rebuild`` applies a freeze: the optimizer is rebuilt through the engine's own
``_configure_optimizer`` over the parameters that stay trainable, and their fp32 masters and
moments are carried without any full-tensor gather: each rank keeps its own slices, the rebuilt
optimizer's partition boundaries say which rank now owns which slice, and only slices that change
owner travel (point to point). ZeRO-3 partitions every parameter on its own, so nothing moves. A
master that is a copy of an fp32 parameter is not carried: the rebuild remakes it from the parameter.
"""
from __future__ import annotations

import gc
import inspect
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Iterable, Iterator, Optional, Sequence

import torch
import torch.distributed as tdist
from packaging.version import Version

from .config import ConfigError

# The backward-hook API the rebuild re-registers (engine._support_torch_style_backward,
# optimizer.register_grad_acc_post_hook) came with DeepSpeed 0.18.3 (PR 7665, 2025-11).
MIN_DEEPSPEED = "0.18.3"
MASTER = "master"  # the fp32 master weight, carried beside the optimizer's per-element state


@dataclass(frozen=True)
class Fragment:
    """Elements [start, start + numel) of ``param`` (flattened) live at [offset, offset + numel) of
    ``tensor``, which the inner optimizer steps."""
    param: torch.nn.Parameter
    start: int
    numel: int
    tensor: torch.Tensor
    offset: int

    def view(self, source: torch.Tensor) -> torch.Tensor:
        """This fragment's range of ``source``, a tensor shaped like ``tensor`` (its grad or a moment)."""
        return source.view(-1).narrow(0, self.offset, self.numel)


class OptimizerLayout:
    """The fragments of the trainable parameters this rank's optimizer holds (see the module doc)."""

    def __init__(self, optimizer: Any, rank: int = 0, world: int = 1):
        self.optimizer = optimizer
        self.rank, self.world = rank, world
        self.kind = _kind(optimizer)
        self.inner: torch.optim.Optimizer = optimizer if self.kind == "torch" else optimizer.optimizer
        self.replicated = self.kind in ("torch", "unfused")

    def param_groups(self) -> list[tuple[dict, list[torch.nn.Parameter]]]:
        """(hyperparameters, model parameters) of each param group, in the optimizer's order."""
        opt, hyper = self.optimizer, [{k: v for k, v in g.items() if k != "params"} for g in self.inner.param_groups]
        if self.kind == "torch":
            return [(h, list(g["params"])) for h, g in zip(hyper, opt.param_groups)]
        if self.kind == "zero3":
            # Sub-groups split large groups; their model parameters are the group's, in order.
            params: list[list[torch.nn.Parameter]] = [[] for _ in hyper]
            for sub_group, group in enumerate(opt.fp16_groups):
                params[opt.sub_group_to_group_id[sub_group]].extend(group)
            return list(zip(hyper, params))
        groups = opt.fp16_groups if self.kind == "unfused" else _lp_groups(opt)
        return [(h, list(g)) for h, g in zip(hyper, groups)]

    def fragments(self) -> list[Fragment]:
        """Every fragment this rank's optimizer holds, in the optimizer's parameter order."""
        opt = self.optimizer
        if self.kind == "torch":
            return [Fragment(p, 0, p.numel(), p, 0) for g in opt.param_groups for p in g["params"]]
        if self.kind == "unfused":
            return [Fragment(p, 0, p.numel(), m, 0)
                    for lp, hp in zip(opt.fp16_groups, opt.fp32_groups) for p, m in zip(lp, hp)]
        if self.kind == "flat":
            flats = _flat_partitions(opt)
            out = []
            for group in _lp_groups(opt):
                for p in group:
                    mapping = getattr(p, "_hp_mapping", None)
                    if mapping is None:  # no element of it in this rank's partition
                        continue
                    out.append(Fragment(p, mapping.lp_fragment_address.start, mapping.lp_fragment_address.numel,
                                        flats[mapping.param_group_index], mapping.hp_fragment_address.start))
            return out
        out = []
        for group in opt.fp16_groups:
            for p in group:
                sub_group, offset, size = opt.grad_position[opt.get_param_id(p)]
                start = self.rank * size
                numel = min(size, max(0, p.ds_numel - start))  # the last ranks' partitions end in padding
                if numel:
                    out.append(Fragment(p, start, numel, opt.fp32_partitioned_groups_flat[sub_group], offset))
        return out

    def owned_fragments(self) -> list[Fragment]:
        """Fragments whose elements this rank alone accounts for: all of a partitioned layout's; of a
        replicated one, a 1/world share of each fragment. Sums over ranks of what each computes on
        its owned fragments count every element exactly once."""
        frags = self.fragments()
        if not self.replicated or self.world == 1:
            return frags
        out = []
        for f in frags:
            lo, hi = f.numel * self.rank // self.world, f.numel * (self.rank + 1) // self.world
            if hi > lo:
                out.append(Fragment(f.param, f.start + lo, hi - lo, f.tensor, f.offset + lo))
        return out

    def tensor_groups(self) -> list[tuple[int, torch.Tensor]]:
        """(param group index, tensor) for each tensor the inner optimizer steps: flat partitions,
        masters or the parameters. ZeRO-3 hands its inner optimizer one sub-group at a time (its
        param groups are empty between steps): its sub-groups are listed with their group."""
        opt = self.optimizer
        if self.kind == "torch":
            return [(i, p) for i, g in enumerate(opt.param_groups) for p in g["params"]]
        if self.kind == "unfused":
            return [(i, m) for i, group in enumerate(opt.fp32_groups) for m in group]
        if self.kind == "flat":
            return list(enumerate(_flat_partitions(opt)))
        return [(opt.sub_group_to_group_id[s], flat) for s, flat in enumerate(opt.fp32_partitioned_groups_flat)]

    def tensors(self) -> list[torch.Tensor]:
        return [t for _, t in self.tensor_groups()]

    def state_keys(self) -> list[str]:
        """Optimizer state keys holding one value per element (Adam: exp_avg, exp_avg_sq)."""
        for tensor in self.tensors():
            state = self.inner.state.get(tensor, {})
            return [k for k, v in state.items() if torch.is_tensor(v) and v.shape == tensor.shape]
        return []


def _kind(optimizer: Any) -> str:
    if isinstance(optimizer, torch.optim.Optimizer):
        return "torch"
    name = type(optimizer).__name__
    if hasattr(optimizer, "fp32_partitioned_groups_flat") and hasattr(optimizer, "grad_position"):
        return "zero3"
    if _flat_partitions(optimizer) is not None and hasattr(optimizer, "optimizer"):
        return "flat"
    if hasattr(optimizer, "fp32_groups") and hasattr(optimizer, "fp16_groups") and hasattr(optimizer, "optimizer"):
        return "unfused"
    if hasattr(optimizer, "fp32_groups_flat"):
        raise ConfigError(f"fp16 with ZeRO-0 ({name}, DeepSpeed's fused fp16 optimizer) is not supported: "
                          "use bf16, or zero_optimization.stage >= 1")
    raise ConfigError(f"the optimizer wrapper {name} is not supported (known: a torch optimizer, DeepSpeed's "
                      "ZeRO-1/2/3 optimizers, its bf16 optimizer and its unfused fp16/bf16 wrapper)")


def _flat_partitions(optimizer: Any) -> Optional[list[torch.Tensor]]:
    """The flat fp32 partitions of ZeRO-1/2 (one per param group) or of the bf16 optimizer."""
    for attr in ("single_partition_of_fp32_groups", "fp32_groups_flat_partition"):
        if hasattr(optimizer, attr):
            return list(getattr(optimizer, attr))
    return None


def _lp_groups(optimizer: Any) -> Iterable[list[torch.nn.Parameter]]:
    """The model parameters of each param group of a ZeRO-1/2 or bf16 optimizer."""
    return optimizer.bit16_groups if hasattr(optimizer, "bit16_groups") else optimizer.bf16_groups


# Private names used here, by owner; probed at attach.
_ENGINE_NAMES = ("_config", "_configure_optimizer", "_configure_basic_optimizer", "_support_torch_style_backward",
                 "_backward_post_hook", "_load_zero_checkpoint", "_get_all_zero_checkpoint_names",
                 "loaded_checkpoint_dp_world_size", "seq_dp_world_size", "client_optimizer")
_LAYOUT_NAMES = {
    "flat": ("destroy", "_lazy_init_hp_params_optimizer_state", "_hp_optimizer_states_linked"),
    "zero3": ("destroy", "get_param_id", "sub_group_to_group_id", "fp16_groups", "create_reduce_and_remove_grad_hooks"),
    "unfused": (),
    "torch": (),
}


def check_engine(engine: Any) -> OptimizerLayout:
    """The engine's optimizer layout, after checking that everything a freeze will use is there and
    supported; otherwise one ConfigError listing each problem."""
    import deepspeed
    problems = []
    if Version(deepspeed.__version__.split("+")[0]) < Version(MIN_DEEPSPEED):
        problems.append(f"DeepSpeed {deepspeed.__version__} is older than {MIN_DEEPSPEED}, the first with the "
                        "backward-hook API a rebuilt optimizer must re-register")
    problems += [f"DeepSpeedEngine.{name} is missing (a DeepSpeed this version does not know)"
                 for name in _ENGINE_NAMES if not hasattr(engine, name)]
    if type(engine).__name__ == "PipelineEngine":
        problems.append("pipeline parallelism is not supported")
    if getattr(engine, "mpu", None) is not None or getattr(engine, "autotp_size", lambda: 1)() > 1:
        problems.append("model / tensor parallelism is not supported (data parallelism only)")
    if getattr(engine, "has_moe_layers", False):
        problems.append("mixture-of-experts layers are not supported")
    if getattr(getattr(engine, "_config", None), "hybrid_engine", None) is not None and \
            engine._config.hybrid_engine.enabled:
        problems.append("hybrid_engine is not supported")
    if engine.zero_optimization() and (engine.zero_offload_optimizer() or engine.zero_offload_param()):
        problems.append("ZeRO offload (offload_optimizer / offload_param) is not supported: its state lives on "
                        "CPU or NVMe behind DeepSpeed's swapper; train without offload")
    if engine.optimizer is None:
        problems.append("the engine has no optimizer (pass one, or an 'optimizer' section, to deepspeed.initialize)")
    layout = None
    if engine.optimizer is not None:
        try:
            layout = OptimizerLayout(engine.optimizer, *_rank_world())
        except ConfigError as err:
            problems.append(str(err))
    if layout is not None:
        problems += [f"{type(engine.optimizer).__name__}.{name} is missing (a DeepSpeed this version does not know)"
                     for name in _LAYOUT_NAMES[layout.kind] if not hasattr(engine.optimizer, name)]
        if layout.kind in ("flat", "zero3") and not hasattr(engine.optimizer, "optimizer"):
            problems.append(f"{type(engine.optimizer).__name__} holds no inner torch optimizer")
        client = engine.client_optimizer
        if client is not None and not callable(client) and not isinstance(client, torch.optim.Optimizer):
            problems.append(f"the client optimizer {type(client).__name__} is neither a torch optimizer nor a "
                            "callable: it cannot be rebuilt over the trainable parameters")
    if problems:
        raise ConfigError("ds_autofreeze cannot attach to this engine: " + "; ".join(problems))
    return layout


def _rank_world() -> tuple[int, int]:
    if tdist.is_available() and tdist.is_initialized():
        return tdist.get_rank(), tdist.get_world_size()
    return 0, 1


@dataclass
class _Piece:
    """A slice of one staying parameter's optimizer data on this rank (before: carried copies; after:
    views into the rebuilt optimizer), by the parameter's index among the staying parameters."""
    index: int
    start: int
    numel: int
    data: dict[str, torch.Tensor]


class Repartitioner:
    """Rebuilds an engine's optimizer over the parameters that stay trainable (module doc)."""

    def __init__(self, engine: Any):
        self.engine = engine
        self.layout = check_engine(engine)
        # The user's param groups as the optimizer holds them; each rebuild keeps their trainable part.
        self.groups = self.layout.param_groups()
        self.origins = list(range(len(self.groups)))  # the optimizer's group i is self.groups[origins[i]]

    @property
    def gradient_clipping(self) -> float:
        return float(self.engine.gradient_clipping() or 0.0)

    @gradient_clipping.setter
    def gradient_clipping(self, value: float) -> None:
        # ZeRO-0 reads the engine's config at every step; ZeRO-1/2/3 and the bf16 optimizer copy it
        # when built (a rebuild after this reads the new one) and keep it in their checkpoints.
        self.engine._config.gradient_clipping = value
        if hasattr(self.engine.optimizer, "clip_grad"):
            self.engine.optimizer.clip_grad = value

    def rebuild(self, frozen: set[int]) -> float:
        """Drop the parameters whose id is in ``frozen`` (already requires_grad False) from the
        optimizer; returns the seconds it took. Collective: every rank, same step, same set."""
        start = time.perf_counter()
        engine, old = self.engine, self.layout
        stay = [p for _, params in self.groups for p in params if id(p) not in frozen and p.requires_grad]
        index = {id(p): i for i, p in enumerate(stay)}
        keys = old.state_keys()
        if old.replicated:  # per-parameter masters and state: kept as they are, re-attached below
            kept = {id(f.param): (f.tensor, old.inner.state.get(f.tensor)) for f in old.fragments()
                    if id(f.param) in index}
        else:
            # An fp32 master that has the model parameter's dtype is a bit-exact copy of it (every step
            # ends by copying the masters into the parameters), and the rebuild makes the new masters
            # from the parameters: carrying it would only keep the old master buffer alive at the peak.
            carry = [*([] if all(f.tensor.dtype == f.param.dtype for f in old.fragments()) else [MASTER]), *keys]
            carried, scalars = self._capture(old, index, carry), self._scalars(old, keys)
        hyper = {origin: {k: v for k, v in g.items() if k != "params"}
                 for origin, g in zip(self.origins, old.inner.param_groups)}
        if hasattr(engine.optimizer, "destroy"):
            engine.optimizer.destroy()  # drops ZeRO's gradient hooks and fp32 fragment links
        # Nothing may keep the old partitions and moments alive while the new ones are allocated:
        # the scheduler holds the old torch optimizer until it is given the new one below, and a
        # training loop may still hold the optimizer deepspeed.initialize returned: it is emptied
        # (using it after a freeze fails loudly instead of silently keeping its memory).
        _empty(old.inner, None if old.kind == "torch" else engine.optimizer)
        engine.optimizer = engine.basic_optimizer = None
        old_kind = old.kind
        scheduler = engine.lr_scheduler if hasattr(engine.lr_scheduler, "optimizer") else None
        if scheduler is not None:
            scheduler.optimizer = None
        self.layout = old = None

        groups, origins = [], []
        for origin, (h, params) in enumerate(self.groups):
            trainable = [p for p in params if id(p) in index]
            if trainable:
                groups.append({**h, "params": trainable})
                origins.append(origin)
        # ZeRO-1/2/3 and the bf16 optimizer hold parameter data (ZeRO-3: partitions) in flat buffers.
        frozen_data = [_data(p) for _, params in self.groups for p in params
                       if id(p) in frozen] if old_kind in ("flat", "zero3") else []
        if frozen_data:
            # Before the rebuild allocates, frozen data in a buffer no staying parameter shares lets it
            # go; the rest waits to see whether the rebuild re-flattens that buffer in place.
            _own_storage(frozen_data, keep={_data(p).untyped_storage().data_ptr() for p in stay})
        with _hooks_without_gathers(old_kind), _no_full_collection(old_kind), _flatten_in_place(old_kind) as in_place:
            engine._configure_optimizer(self._basic_optimizer(groups), groups)
        _own_storage(frozen_data, keep=in_place)
        self.origins = origins
        new = self.layout = OptimizerLayout(engine.optimizer, *_rank_world())
        # Hyperparameters a scheduler may have moved (lr, initial_lr, step counters) carry over.
        for origin, group in zip(origins, new.inner.param_groups):
            group.update(hyper[origin])
        if new.replicated:
            for f in new.fragments():
                master, state = kept[id(f.param)]
                if f.tensor is not master:
                    f.tensor.data.copy_(master.data)
                if state:
                    new.inner.state[f.tensor] = state
        else:
            _exchange(carried, self._targets(new, index, keys, scalars), carry)
        self._link_state()
        if scheduler is not None:
            scheduler.optimizer = new.inner
        if engine._support_torch_style_backward:
            engine.optimizer.register_grad_acc_post_hook(engine._backward_post_hook)
        return time.perf_counter() - start

    def _link_state(self) -> None:
        """ZeRO-1/2 and the bf16 optimizer link each parameter to its optimizer-state fragments once,
        after their first step; state put in place by a rebuild or a checkpoint load is linked now
        (DeepSpeed's safe_get_* and checkpoint code read through those links)."""
        opt = self.engine.optimizer
        if hasattr(opt, "_lazy_init_hp_params_optimizer_state") and self.layout.state_keys():
            opt._hp_optimizer_states_linked = False
            opt._lazy_init_hp_params_optimizer_state()

    def after_load(self) -> None:
        """After DeepSpeed loaded a checkpoint into the optimizer."""
        self.layout = OptimizerLayout(self.engine.optimizer, *_rank_world())
        self._link_state()

    def _capture(self, layout: OptimizerLayout, index: dict[int, int], keys: list[str]) -> list[_Piece]:
        """This rank's slices of the staying parameters' ``keys`` (MASTER: the fp32 master; the others:
        optimizer state), to carry over: copies or views of the old partitions, whichever makes the
        lower peak on this rank. Copies let the old partitions go before the rebuild allocates the new
        state, and pay off on a rank whose partition was mostly frozen parameters; views keep the old
        partitions until the exchange, but copy nothing (on one rank, always the lower peak)."""
        frags = [f for f in layout.fragments() if id(f.param) in index]
        staying = sum(getattr(p, "ds_numel", p.numel()) for _, params in self.groups for p in params
                      if id(p) in index)
        per_element = 1 + len(layout.state_keys())  # the master and each state tensor
        masters = sum(t.numel() for t in layout.tensors())
        old = masters * per_element
        freed_anyway = 0 if MASTER in keys else masters  # an uncarried master goes with the old optimizer
        new = staying / layout.world * per_element  # ZeRO balances partitions over ranks
        clones = sum(f.numel for f in frags) * len(keys)
        copy = max(clones, clones + new - old) < max(0.0, new - freed_anyway)
        out = []
        for f in frags:
            state = layout.inner.state.get(f.tensor, {})
            sources = {MASTER: f.tensor.data, **state}
            views = {k: f.view(sources[k]) for k in keys if k in sources}
            out.append(_Piece(index[id(f.param)], f.start, f.numel,
                              {k: v.clone() if copy else v for k, v in views.items()}))
        return out

    def _scalars(self, layout: OptimizerLayout, keys: list[str]) -> dict[int, dict[str, Any]]:
        """Per origin group, the optimizer state entries that are not per element (Adam's step)."""
        out: dict[int, dict[str, Any]] = {}
        for group, tensor in layout.tensor_groups():
            state = layout.inner.state.get(tensor)
            if state and self.origins[group] not in out:
                out[self.origins[group]] = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in state.items()
                                            if k not in keys}
        return out

    def _targets(self, layout: OptimizerLayout, index: dict[int, int], keys: list[str],
                 scalars: dict[int, dict[str, Any]]) -> list[_Piece]:
        """Views of the rebuilt optimizer's masters and (freshly allocated) moments, per fragment."""
        frags = layout.fragments()
        if keys:
            # The exchange fills every fragment's range, so only the rest (alignment padding) is zeroed:
            # zeroing whole moments first was a tenth of a repartition's time.
            covered: dict[int, list[tuple[int, int]]] = {}
            for f in frags:
                covered.setdefault(id(f.tensor), []).append((f.offset, f.numel))
            for group, tensor in layout.tensor_groups():
                layout.inner.state[tensor] = {**{k: (v.clone() if torch.is_tensor(v) else v)
                                                 for k, v in scalars.get(self.origins[group], {}).items()},
                                              **{k: _zero_uncovered(torch.empty_like(tensor), covered.get(id(tensor), []))
                                                 for k in keys}}
        return [_Piece(index[id(f.param)], f.start, f.numel,
                       {MASTER: f.view(f.tensor.data), **{k: f.view(layout.inner.state[f.tensor][k]) for k in keys}})
                for f in frags]

    def _basic_optimizer(self, groups: list[dict]) -> Any:
        """None (DeepSpeed builds it from the config's 'optimizer' section), or a new instance of the
        client's optimizer over ``groups``."""
        client = self.engine.client_optimizer
        if client is None:
            return None
        if isinstance(client, torch.optim.Optimizer):
            # Only what __init__ takes: some defaults are set by the class itself (torch's AdamW adds
            # decoupled_weight_decay, which its __init__ refuses); the groups carry every value anyway.
            takes = inspect.signature(type(client).__init__).parameters
            open_ended = any(p.kind is p.VAR_KEYWORD for p in takes.values())
            return type(client)(groups, **{k: v for k, v in client.defaults.items() if open_ended or k in takes})
        return client(groups)

    def training_state_bytes(self) -> dict[str, int]:
        """Bytes this rank holds beyond the model weights: fp32 master copies, optimizer moments and
        gradient buffers (counted per storage, so views into DeepSpeed's flat buffers count once).
        Gradients exist between backward and step; ZeRO frees them after."""
        engine, layout = self.engine, self.layout
        weights = {p.untyped_storage().data_ptr() for p in engine.module.parameters()}
        seen: set[int] = set()

        def size(tensors) -> int:
            total = 0
            for t in tensors:
                if not torch.is_tensor(t) or t.dim() == 0:
                    continue
                key = t.untyped_storage().data_ptr()
                if key not in weights and key not in seen:
                    seen.add(key)
                    total += t.untyped_storage().nbytes()
            return total

        opt, tensors = engine.optimizer, layout.tensors()
        moments = [v for state in layout.inner.state.values() for v in state.values()]
        grads = [p.grad for p in engine.module.parameters()] + [t.grad for t in tensors]
        grads += [g for group in getattr(opt, "averaged_gradients", {}).values() for g in (group or [])]
        grads += [getattr(opt, "grads_in_partition", None), getattr(opt, "grad_partitions_flat_buffer", None)]
        grads += list(getattr(opt, "ipg_buffer", None) or [])
        return {"master_weights": size(tensors), "optimizer_moments": size(moments), "gradients": size(grads)}

    # ------------------------------------------------------------------ checkpoints on another world size
    def load_resharded(self, load_dir: str, tag: str, load_optimizer_states: bool = True) -> bool:
        """DeepSpeed refuses ZeRO-1/2 optimizer state saved on another data-parallel size. The files
        hold each saved rank's flat partition and where every parameter's fragment lies in it
        (param_slice_mappings): each rank reads them one at a time and copies the pieces that
        overlap its own fragments (masters, and moments with ``load_optimizer_states``)."""
        engine = self.engine
        if engine.loaded_checkpoint_dp_world_size == engine.seq_dp_world_size:
            return False  # DeepSpeed's own path
        if self.layout.kind != "flat":
            raise ConfigError(f"{os.path.join(load_dir, tag)}: saved on {engine.loaded_checkpoint_dp_world_size} "
                              f"ranks; with this optimizer ({self.layout.kind}) a checkpoint resumes on the same "
                              f"world size only ({engine.seq_dp_world_size} now). Convert it with DeepSpeed's "
                              "ds_to_universal, or train with ZeRO-1/2 to re-pack")
        names = {id(p): n for n, p in engine.module.named_parameters()}
        params = [p for _, ps in self.groups for p in ps if p.requires_grad]
        index = {names[id(p)]: i for i, p in enumerate(params)}
        layout = self.layout
        files = engine._get_all_zero_checkpoint_names(load_dir, tag, engine.bfloat16_enabled())
        keys, scalars, param_groups = None, None, None
        targets: Optional[list[_Piece]] = None
        filled: dict[str, int] = {}  # per parameter, elements read so far: fragments follow each other in rank order
        for name in files:  # one saved rank at a time: the peak is one partition
            saved = torch.load(name, map_location="cpu", weights_only=False)["optimizer_state_dict"]
            base = saved["base_optimizer_state"]
            param_groups = param_groups or base["param_groups"]
            if targets is None:
                first = base["state"].get(0, {})
                keys = sorted(k for k, v in first.items() if torch.is_tensor(v) and v.dim() == 1) \
                    if load_optimizer_states else []
                scalars = {origin: {k: v for k, v in base["state"].get(g, {}).items() if k not in keys and
                                    not (torch.is_tensor(v) and v.dim() == 1)}
                           for g, origin in enumerate(self.origins)}
                targets = self._targets(layout, {id(p): i for i, p in enumerate(params)}, keys, scalars)
            pieces = []
            for group, (mapping, fp32) in enumerate(zip(saved["param_slice_mappings"],
                                                        saved["single_partition_of_fp32_groups"])):
                state = base["state"].get(group, {})
                for pname, frag in mapping.items():
                    if pname not in index:
                        continue
                    start = filled.get(pname, 0)
                    filled[pname] = start + frag.numel
                    data = {MASTER: fp32.narrow(0, frag.start, frag.numel),
                            **{k: state[k].narrow(0, frag.start, frag.numel) for k in keys}}
                    pieces.append(_Piece(index[pname], start, frag.numel, data))
            _copy_overlaps(pieces, targets, [MASTER, *keys])
        missing = set(index) - set(filled)
        if missing:
            raise RuntimeError(f"{os.path.join(load_dir, tag)}: no optimizer state for trainable parameters "
                               f"{sorted(missing)[:3]} (saved by a DeepSpeed too old to reshard?)")
        self._link_state()
        if load_optimizer_states:
            # Hyperparameters the scheduler moved (lr) come with the state, as in DeepSpeed's own load.
            for group, saved_group in zip(layout.inner.param_groups, param_groups):
                group.update({k: v for k, v in saved_group.items() if k != "params"})
        return True


@contextmanager
def _hooks_without_gathers(kind: str) -> Iterator[None]:
    """ZeRO-3's constructor all-gathers every trainable parameter, one collective each, to register
    its gradient hooks on the whole parameter, and partitions it again; with torch >= 2.1 those are
    post-accumulate-grad hooks, which need no gathered data, and the gathers were a third of a
    ZeRO-3 rebuild. Within the rebuild they are skipped."""
    if kind != "zero3" or not hasattr(torch.Tensor, "register_post_accumulate_grad_hook"):
        yield
        return
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3 as Stage3
    original = Stage3.create_reduce_and_remove_grad_hooks

    def create_hooks(optimizer: Any) -> None:
        params = [p for group in optimizer.fp16_groups for p in group]
        saved = [(p, p.all_gather, p.partition) for p in params]
        for p in params:
            p.all_gather = p.partition = _nothing
        try:
            original(optimizer)
        finally:
            for p, gather, partition in saved:
                p.all_gather, p.partition = gather, partition

    Stage3.create_reduce_and_remove_grad_hooks = create_hooks
    try:
        yield
    finally:
        Stage3.create_reduce_and_remove_grad_hooks = original


@contextmanager
def _no_full_collection(kind: str) -> Iterator[None]:
    """ZeRO-3's constructor copies the partitions into one buffer and runs a full gc.collect() on the
    way, for device memory that reference cycles might still hold. Under a transformers model's
    Python heap that collection was a third of a ZeRO-3 rebuild (0.85 s of 2.6, 132M Llama, 2 ranks),
    and it finds nothing there: the rebuild has already emptied the old optimizer (``_empty``), and
    the partitions it moves are freed as they go by reference counting. Within the rebuild it is
    skipped; Python's own collector still runs as usual."""
    from deepspeed.runtime.zero import utils
    if kind != "zero3" or getattr(utils, "gc", None) is not gc:
        yield
        return
    utils.gc = SimpleNamespace(collect=_nothing)
    try:
        yield
    finally:
        utils.gc = gc


def _nothing(*args: Any, **kwargs: Any) -> None:
    return None


def _empty(inner: torch.optim.Optimizer, wrapper: Any) -> None:
    inner.state = type(inner.state)()
    for group in inner.param_groups:
        group["params"] = []
    if wrapper is not None:
        vars(wrapper).clear()


def _data(p: torch.nn.Parameter) -> torch.Tensor:
    """What holds a parameter's data: itself, or under ZeRO-3 its partition."""
    return getattr(p, "ds_tensor", p)


def _own_storage(tensors: Sequence[torch.Tensor], keep: set[int]) -> None:
    """Give each tensor its own storage, unless that storage's data_ptr is in ``keep``. ZeRO-1/2 and
    the bf16 optimizer keep a group's parameters as views of one flat buffer, ZeRO-3 the partitions of
    all of them; when a rebuild moves the staying ones to a new buffer, the frozen ones would keep the
    old one (with the staying parameters' old copies) alive."""
    for t in tensors:
        storage = t.untyped_storage()
        if storage.data_ptr() not in keep and storage.nbytes() > t.numel() * t.element_size():
            t.data = t.data.clone()


@contextmanager
def _flatten_in_place(kind: str) -> Iterator[set[int]]:
    """ZeRO-1/2 and the bf16 optimizer copy a group's parameters into a new flat buffer when built
    (ZeRO-3 all partitions of this rank, ``defragment``), and a rebuild then had to give the frozen
    ones their own storage too: a copy of the whole model, two fifths of a ZeRO-2 rebuild. A freeze
    leaves the staying parameters as a run of the old buffer already laid out as the new one would be
    (the frozen prefix comes first in module order), so within the rebuild that run becomes the new
    buffer, a view: nothing is copied and the old buffer stays all in use, the frozen prefix at its
    front. Yields the data_ptrs of the storages reused so. Where the run does not line up (another
    parameter order; ZeRO-3 with two param groups, whose runs alternate; a padded end past the old
    one), DeepSpeed's own copy runs; and where DeepSpeed lacks what is patched, nothing is."""
    in_place: set[int] = set()

    def view_or(original: Any, tensors: Sequence[torch.Tensor], paddings: Sequence[int], alignment: int,
                *args: Any, **kwargs: Any) -> torch.Tensor:
        flat = _run_view(tensors, paddings, alignment)
        if flat is None:
            return original(*args, **kwargs)
        in_place.add(flat.untyped_storage().data_ptr())
        return flat

    def method(original: Any) -> Any:  # flatten_dense_tensors_aligned(self, tensor_list, alignment, ...)
        def flatten(self: Any, tensor_list: list[torch.Tensor], alignment: int, **kwargs: Any) -> torch.Tensor:
            tensors = [t.cpu_data for t in tensor_list] if kwargs.get("use_cpu_data") else tensor_list
            return view_or(original, tensors, kwargs.get("param_padding") or [0] * len(tensors), alignment,
                           self, tensor_list, alignment, **kwargs)
        return flatten

    def function(original: Any) -> Any:  # ZeRO-3's defragment(tensors): no padding
        return lambda tensors: view_or(original, tensors, [0] * len(tensors), 1, tensors)

    owners: list[tuple[Any, str, Any]] = []
    if kind == "flat":
        from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
        from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
        owners = [(DeepSpeedZeroOptimizer, "flatten_dense_tensors_aligned", method),
                  (BF16_Optimizer, "_flatten_dense_tensors_aligned", method)]
    elif kind == "zero3":
        from deepspeed.runtime.zero import stage3
        owners = [(stage3, "defragment", function)]
    owners = [(owner, name, wrap) for owner, name, wrap in owners if hasattr(owner, name)]
    originals = [getattr(owner, name) for owner, name, _ in owners]
    for (owner, name, wrap), original in zip(owners, originals):
        setattr(owner, name, wrap(original))
    try:
        yield in_place
    finally:
        for (owner, name, _), original in zip(owners, originals):
            setattr(owner, name, original)


def _run_view(tensors: Sequence[torch.Tensor], paddings: Sequence[int], alignment: int) -> Optional[torch.Tensor]:
    """DeepSpeed's flat buffer of ``tensors`` (each followed by its padding, the whole padded to a
    multiple of ``alignment``) as a view of the storage they already fill in that order; None if they
    do not, or if the padded end would pass the storage's end. Padding is zero, as in DeepSpeed's."""
    if not tensors:
        return None
    first = tensors[0]
    storage, base = first.untyped_storage(), first.storage_offset()
    offset, gaps = base, []
    for t, pad in zip(tensors, paddings):
        if (t.untyped_storage().data_ptr() != storage.data_ptr() or t.storage_offset() != offset
                or not t.is_contiguous() or t.dtype != first.dtype):
            return None
        offset += t.numel()
        gaps.append((offset, pad))
        offset += pad
    numel = -(-(offset - base) // alignment) * alignment
    if base + numel > storage.nbytes() // first.element_size():
        return None
    flat = first.detach().as_strided((numel,), (1,), base)
    for start, pad in [*gaps, (offset, base + numel - offset)]:
        if pad:
            flat.narrow(0, start - base, pad).zero_()
    return flat


def _zero_uncovered(tensor: torch.Tensor, ranges: list[tuple[int, int]]) -> torch.Tensor:
    """``tensor`` with every element outside the (offset, numel) ``ranges`` set to zero."""
    flat, end = tensor.view(-1), 0
    for offset, numel in sorted(ranges):
        if offset > end:
            flat.narrow(0, end, offset - end).zero_()
        end = max(end, offset + numel)
    if end < flat.numel():
        flat.narrow(0, end, flat.numel() - end).zero_()
    return tensor


def _overlaps(a: Sequence[tuple[int, int, int]], b: Sequence[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """(index, lo, hi) where the ranges (index, start, numel) of ``a`` and ``b`` overlap, in order."""
    by_index: dict[int, list[tuple[int, int]]] = {}
    for i, s, n in b:
        by_index.setdefault(i, []).append((s, s + n))
    out = []
    for i, s, n in sorted(a):
        for lo, hi in sorted(by_index.get(i, [])):
            lo, hi = max(s, lo), min(s + n, hi)
            if lo < hi:
                out.append((i, lo, hi))
    return out


def _slice(pieces: dict[int, list[_Piece]], index: int, lo: int, hi: int, key: str) -> torch.Tensor:
    for p in pieces[index]:
        if p.start <= lo and hi <= p.start + p.numel:
            return p.data[key].narrow(0, lo - p.start, hi - lo)
    raise RuntimeError(f"no piece of parameter {index} covers [{lo}, {hi})")


def _copy_overlaps(sources: list[_Piece], targets: list[_Piece], keys: list[str]) -> None:
    src, dst = _by_index(sources), _by_index(targets)
    for i, lo, hi in _overlaps([(p.index, p.start, p.numel) for p in sources],
                               [(p.index, p.start, p.numel) for p in targets]):
        for key in keys:
            _slice(dst, i, lo, hi, key).copy_(_slice(src, i, lo, hi, key))


def _by_index(pieces: list[_Piece]) -> dict[int, list[_Piece]]:
    out: dict[int, list[_Piece]] = {}
    for p in pieces:
        out.setdefault(p.index, []).append(p)
    return out


def _exchange(carried: list[_Piece], targets: list[_Piece], keys: list[str]) -> None:
    """Fill ``targets`` from ``carried`` across ranks (partitioned layouts): local overlaps are
    copied, the others sent point to point, slice by slice, straight from the carried copies into
    the targets (no staging buffers). Every rank computes the same plan from everyone's ranges."""
    rank, world = _rank_world()
    keys = [k for k in keys if all(k in p.data for p in targets)]
    mine = ([(p.index, p.start, p.numel) for p in carried], [(p.index, p.start, p.numel) for p in targets])
    if world == 1:
        _copy_overlaps(carried, targets, keys)
        return
    everyone: list = [None] * world
    tdist.all_gather_object(everyone, mine)
    src_pieces, dst_pieces = _by_index(carried), _by_index(targets)
    requests = []
    for src in range(world):
        for dst in range(world):
            if rank not in (src, dst):
                continue
            overlaps = _overlaps(everyone[src][0], everyone[dst][1])
            for n, ((i, lo, hi), key) in enumerate((o, k) for o in overlaps for k in keys):
                if src == dst:
                    _slice(dst_pieces, i, lo, hi, key).copy_(_slice(src_pieces, i, lo, hi, key))
                elif src == rank:
                    requests.append(tdist.isend(_slice(src_pieces, i, lo, hi, key).contiguous(), dst, tag=n))
                else:
                    requests.append(tdist.irecv(_slice(dst_pieces, i, lo, hi, key), src, tag=n))
    for r in requests:
        r.wait()
