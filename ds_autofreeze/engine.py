"""AutoFreezeEngine: a DeepSpeedEngine whose optimizer only ever holds the trainable parameters.

The freeze decision is the decider's (``deciders.py``); applying it — and only here — is
``AutoFreezeEngine.freeze_and_repartition``: the frozen parameters leave the optimizer (ZeRO
partitions, fp32 master copies, moments, gradient buckets and hooks are rebuilt over the
trainable parameters only), while the parameters that stay trainable keep their master weights
and optimizer state, so their update continues as if nothing had happened.

Flipping ``requires_grad`` alone is not enough: ZeRO keeps moving frozen parameters (momentum,
weight decay) and keeps their flat fp32 partitions alive. Rebuilding through the engine's own
``_configure_optimizer`` keeps every ZeRO invariant DeepSpeed relies on.

ZeRO-3 also partitions the weights. With the activation cache the frozen blocks (and the
embeddings) never run, so their weights are never all-gathered. Without it they are gathered for
the forward pass every step: DeepSpeed re-partitions every weight at each optimizer step (marking
them persistent, ``ds_persist``, was measured to change nothing).
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Optional, Union

import deepspeed
import torch
from deepspeed import comm as dist
from deepspeed.runtime.config import DeepSpeedConfig
from deepspeed.runtime.engine import DeepSpeedEngine
from deepspeed.runtime.lr_schedules import get_torch_optimizer
from deepspeed.runtime.tensor_parallel.init_utils import load_ds_config
from deepspeed.utils import (safe_get_full_fp32_param, safe_get_full_optimizer_state, safe_set_full_fp32_param,
                             safe_set_full_optimizer_state)

from .cache import ActivationCache, crc32_of, row_keys
from .config import AutoFreezeConfig, ConfigError, get_autofreeze_config
from .deciders import Decider, build_decider
from .model_adapter import ModelAdapter

STATE_FILE = "autofreeze_state.json"
GRAD_ACC_FILE = "autofreeze_grad_acc_rank{rank}.pt"


def _flat_partitions(optimizer: Any) -> Optional[list[torch.Tensor]]:
    """The flat fp32 partitions of DeepSpeed's ZeRO wrappers (ZeRO-1/2: one per group, ZeRO-3: one
    per sub-group, bf16 stage 0 likewise), or None for a plain torch optimizer holding the model's
    parameters."""
    for attr in ("single_partition_of_fp32_groups", "fp32_groups_flat_partition", "fp32_partitioned_groups_flat"):
        if hasattr(optimizer, attr):
            return list(getattr(optimizer, attr))
    return None


class AutoFreezeEngine(DeepSpeedEngine):
    """DeepSpeed engine that freezes a growing prefix of the model's blocks during training."""

    def __init__(self, *args: Any, autofreeze: AutoFreezeConfig, **kwargs: Any):
        params = kwargs.get("model_parameters")
        params = list(kwargs["model"].parameters()) if params is None else list(params)
        # The user's param groups (weight-decay split, per-group lr) are what each rebuild filters.
        groups = [dict(g, params=list(g["params"])) for g in params] if params and isinstance(params[0], dict) \
            else [{"params": params}]
        kwargs["model_parameters"], origins = _trainable_groups(groups)
        super().__init__(*args, **kwargs)
        self._param_groups, self._group_origin = groups, origins
        self.autofreeze_config = autofreeze
        self.adapter = ModelAdapter(self.module)
        self.freeze_events: list[dict[str, Any]] = []
        self.repartition_seconds: list[float] = []
        self.decider: Optional[Decider] = None
        self.cache: Optional[ActivationCache] = None
        self._grad_acc: Optional[torch.Tensor] = None
        self._grad_acc_slices: list[tuple[int, int]] = []  # per block: [start, end) in _grad_acc
        self._grad_hooks: list[Any] = []
        if autofreeze.enabled:
            self.decider = build_decider(autofreeze.decider, self.num_blocks, autofreeze.total_steps)
            self._rebuild_grad_accumulator()
            self._apply_decision()  # a static decider freezes before the first step

    # ------------------------------------------------------------------ public surface
    @property
    def num_blocks(self) -> int:
        return self.adapter.num_blocks

    @property
    def num_frozen_blocks(self) -> int:
        return self.adapter.num_frozen

    def trainable_parameter_count(self) -> int:
        return sum(_numel(p) for p in self.module.parameters() if p.requires_grad)

    def training_state_bytes(self) -> dict[str, int]:
        """Bytes this rank holds beyond the model weights: fp32 master copies, optimizer moments and
        gradient buffers (counted per storage, so views into DeepSpeed's flat buffers count once).
        Gradients exist between backward and step; ZeRO frees them after."""
        weights = {p.untyped_storage().data_ptr() for p in self.module.parameters()}
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

        opt = self.optimizer
        flats = _flat_partitions(opt) or []
        masters = [m for _, m in self._master_pairs()[1]] if not flats else flats
        inner = opt.optimizer if hasattr(opt, "optimizer") else opt
        moments = [v for state in inner.state.values() for v in state.values()]
        grads = [p.grad for p in self.module.parameters()] + [f.grad for f in flats]
        grads += [g for group in getattr(opt, "averaged_gradients", {}).values() for g in (group or [])]
        grads += [getattr(opt, "grads_in_partition", None), getattr(opt, "grad_partitions_flat_buffer", None)]
        grads += list(getattr(opt, "ipg_buffer", None) or [])
        return {"master_weights": size(masters), "optimizer_moments": size(moments), "gradients": size(grads)}

    def train(self, mode: bool = True) -> "AutoFreezeEngine":
        super().train(mode)
        # Frozen blocks stay in eval mode (no dropout): their output must be a pure function
        # of their input, which is what makes it cacheable and the cached path exact.
        self.adapter.restore_frozen_eval()
        return self

    def step(self, lr_kwargs: Optional[dict] = None) -> None:
        steps_before = self.global_steps
        super().step(lr_kwargs)
        if self.decider is not None and self.global_steps != steps_before:
            self._apply_decision()

    def attach_cache(self, cache: ActivationCache) -> None:
        """Serve the frozen prefix's output from ``cache`` in training forwards that pass
        ``example_ids``; the cache follows every boundary move from now on."""
        self.cache = cache
        if self.num_frozen_blocks:
            cache.set_boundary(self.num_frozen_blocks, self._frozen_weights_fingerprint())

    def forward(self, *inputs: Any, example_ids: Optional[torch.Tensor] = None, **kwargs: Any) -> Any:
        """The model's forward; with a cache and ``example_ids`` (dataset indices of the batch),
        the frozen blocks are skipped and their output comes from the cache."""
        k = self.num_frozen_blocks
        if self.cache is None or example_ids is None or k == 0 or inputs or not self.module.training:
            return super().forward(*inputs, **kwargs)
        hidden = self._frozen_prefix_output([int(i) for i in example_ids], kwargs)
        with self.adapter.run_from(k, hidden):
            return super().forward(**kwargs)

    def _frozen_prefix_output(self, ids: list[int], inputs: dict[str, Any]) -> torch.Tensor:
        """The cache path: hidden states entering the first trainable block, (rows, T, H). Misses
        are computed (from the previous boundary's entry when there is one) and stored.

        An example may enter the blocks as several rows (multiple choice: one per choice, inputs
        (B, C, T)), each its own cache entry (``cache.row_keys``). Where the head never reads
        padding positions, entries are stored without them and come back zero-padded: padding
        rows reach the loss only as keys the attention mask weights by an exact zero."""
        k = self.num_frozen_blocks
        model_inputs = {name: v for name, v in inputs.items() if name != "labels"}
        per = int(torch.Size(model_inputs["input_ids"].shape[1:-1]).numel())
        seq_len = model_inputs["input_ids"].shape[-1]
        entries = self.cache.get(row_keys(ids, per))
        missing = sorted({j // per for j, e in enumerate(entries) if e is None})  # examples
        if missing:
            mask = model_inputs.get("attention_mask")
            lengths = _unpadded_lengths(mask) if self.adapter.pad_rows_unread and mask is not None else None
            prev_k, prev = self.cache.get_previous(row_keys([ids[j] for j in missing], per))
            prev = {j: prev[n * per:(n + 1) * per] for n, j in enumerate(missing)}
            from_prev = [j for j in missing if all(e is not None for e in prev[j])]
            from_embeddings = [j for j in missing if j not in from_prev]
            for examples, start in ((from_prev, prev_k), (from_embeddings, None)):
                if not examples:
                    continue
                sub = {name: v[examples] for name, v in model_inputs.items()}
                begin = None
                if start is not None:  # run only the newly frozen blocks, from the previous boundary's entries
                    begin = (start, _padded([e for j in examples for e in prev[j]], seq_len, self.device))
                computed = self.adapter.hidden_before(k, sub, start=begin)
                rows = row_keys(examples, per)  # positions in this batch
                self.cache.put(row_keys([ids[j] for j in examples], per), computed,
                               [lengths[r] for r in rows] if lengths is not None else None)
                for row, value in zip(rows, computed):
                    entries[row] = value
        return _padded(entries, seq_len, self.device)

    def _frozen_weights_fingerprint(self, num_frozen_blocks: Optional[int] = None) -> str:
        k = self.num_frozen_blocks if num_frozen_blocks is None else num_frozen_blocks
        params = [p for m in self.adapter.frozen_modules(k) for p in m.parameters()]
        with deepspeed.zero.GatheredParameters(params, enabled=self.zero_optimization_partition_weights()):
            return crc32_of(params)

    def freeze_and_repartition(self, num_frozen_blocks: int) -> None:
        """Freeze embeddings + blocks[:num_frozen_blocks] and rebuild the optimizer over the rest.

        Collective: every rank must call it at the same step with the same argument.
        """
        if num_frozen_blocks == self.num_frozen_blocks:
            return
        if not self.num_frozen_blocks < num_frozen_blocks < self.num_blocks:
            raise ValueError(f"num_frozen_blocks must grow and leave a block trainable: "
                             f"{self.num_frozen_blocks} -> {num_frozen_blocks} of {self.num_blocks}")
        start = time.perf_counter()
        newly_frozen = {id(p) for m in self.adapter.frozen_modules(num_frozen_blocks) for p in m.parameters()}
        stay = [p for p in self.module.parameters() if p.requires_grad and id(p) not in newly_frozen]
        carried = self._capture_optimizer_state(stay)
        old_groups = {origin: {k: v for k, v in g.items() if k != "params"}
                      for origin, g in zip(self._group_origin, self.optimizer.param_groups)}
        if hasattr(self.optimizer, "destroy"):
            self.optimizer.destroy()  # drops ZeRO's gradient hooks and fp32 fragment links
        self.optimizer = self.basic_optimizer = None
        self.adapter.set_frozen(num_frozen_blocks)

        groups, self._group_origin = _trainable_groups(self._param_groups)
        self._configure_optimizer(None, groups)
        # Hyperparameters a scheduler may have moved (lr, initial_lr, step counters) carry over.
        for origin, group in zip(self._group_origin, self.optimizer.param_groups):
            group.update(old_groups.get(origin, {}))
        self._restore_optimizer_state(carried)
        if self.lr_scheduler is not None and hasattr(self.lr_scheduler, "optimizer"):
            self.lr_scheduler.optimizer = get_torch_optimizer(self.optimizer)
        if self._support_torch_style_backward:
            self.optimizer.register_grad_acc_post_hook(self._backward_post_hook)
        if self.decider is not None:
            self._rebuild_grad_accumulator()
        if self.cache is not None:
            self.cache.set_boundary(num_frozen_blocks, self._frozen_weights_fingerprint())
        self.repartition_seconds.append(time.perf_counter() - start)

    # ------------------------------------------------------------------ decisions
    def _apply_decision(self) -> None:
        step = self.global_steps
        norms = None
        if self.decider.needs_grad_stats and self.decider.is_decision_step(step):
            norms = self._block_grad_norms()
        new = self.decider.decide(step, self.num_frozen_blocks, norms)
        if norms is not None and dist.is_initialized() and dist.get_world_size() > 1:
            # Rank 0's decision is the one applied everywhere, so ranks can never diverge even if
            # float reductions differed. Deciders without statistics decide from the step alone.
            decided = torch.tensor([new], dtype=torch.long, device=self.device)
            dist.broadcast(decided, src=0)
            new = int(decided.item())
        if new > self.num_frozen_blocks:
            self.freeze_and_repartition(new)
            event = {"step": step, "frozen_blocks": new,
                     "trainable_params": self.trainable_parameter_count(),
                     "repartition_seconds": round(self.repartition_seconds[-1], 4)}
            self.freeze_events.append(event)
            if self.autofreeze_config.log_freezes and self.global_rank == 0:
                print(f"[autofreeze] step {step}: froze blocks 0..{new - 1} of {self.num_blocks} "
                      f"(trainable params {event['trainable_params']:,}, "
                      f"repartition {event['repartition_seconds']:.2f}s)", flush=True)

    def _rebuild_grad_accumulator(self) -> None:
        """One flat fp32 buffer laid out in block order for the trainable blocks' gradient sums."""
        for handle in self._grad_hooks:
            handle.remove()
        self._grad_hooks, self._grad_acc_slices = [], []
        if not self.decider.needs_grad_stats:
            return
        sizes = [sum(_numel(p) for p in self.adapter.block_parameters(i)) if i >= self.num_frozen_blocks else 0
                 for i in range(self.num_blocks)]
        self._grad_acc = torch.zeros(sum(sizes), dtype=torch.float32, device=self.device)
        offset = 0
        for i, size in enumerate(sizes):
            self._grad_acc_slices.append((offset, offset + size))
            if size:
                for p in self.adapter.block_parameters(i):
                    view = self._grad_acc[offset:offset + _numel(p)].view(getattr(p, "ds_shape", p.shape))
                    # A tensor hook sees each micro-batch's local gradient before DeepSpeed moves
                    # it into its buckets, for every ZeRO stage alike.
                    self._grad_hooks.append(p.register_hook(_accumulate_into(view)))
                    offset += _numel(p)

    def _block_grad_norms(self) -> list[float]:
        """L1 norm per block of the gradient summed since the last decision, averaged over ranks."""
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self._grad_acc)
            self._grad_acc.div_(dist.get_world_size())
        norms = [self._grad_acc[a:b].abs().sum().item() if b > a else 0.0 for a, b in self._grad_acc_slices]
        self._grad_acc.zero_()
        return norms

    # ------------------------------------------------------------------ optimizer state carry-over
    def _master_pairs(self) -> tuple[Any, list[tuple[torch.nn.Parameter, torch.Tensor]]]:
        """(torch optimizer, [(model param, the tensor it optimizes)]) for optimizers that keep one
        master per parameter: a plain torch optimizer (the param itself) or DeepSpeed's unfused
        fp16/bf16 wrapper (an fp32 copy)."""
        if hasattr(self.optimizer, "fp32_groups") and hasattr(self.optimizer, "fp16_groups"):
            pairs = [(p, m) for lp, hp in zip(self.optimizer.fp16_groups, self.optimizer.fp32_groups)
                     for p, m in zip(lp, hp)]
            return self.optimizer.optimizer, pairs
        return self.optimizer, [(p, p) for g in self.optimizer.param_groups for p in g["params"]]

    def _capture_optimizer_state(self, params: list[torch.nn.Parameter]) -> dict[str, Any]:
        flats = _flat_partitions(self.optimizer)
        if flats is None:
            inner, pairs = self._master_pairs()
            keep = {id(p) for p in params}
            return {"kind": "per_param", "state": {p: (None if m is p else m.detach().clone(), inner.state.get(m))
                                                   for p, m in pairs if id(p) in keep}}
        inner = self.optimizer.optimizer
        flat_state = inner.state.get(flats[0], {})
        per_element = [k for k, v in flat_state.items() if torch.is_tensor(v) and v.shape == flats[0].shape]
        scalars = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in flat_state.items() if k not in per_element}
        if flat_state and hasattr(self.optimizer, "_lazy_init_hp_params_optimizer_state"):
            # ZeRO-1/2 links the fragments after the step of group 0, before later groups have
            # any state, and never again (stage_1_and_2._optimizer_step): link them now.
            self.optimizer._hp_optimizer_states_linked = False
            self.optimizer._lazy_init_hp_params_optimizer_state()
        # Collective gathers: the same params in the same order on every rank.
        master = {p: safe_get_full_fp32_param(p) for p in params}
        moments = {p: {k: safe_get_full_optimizer_state(p, k) for k in per_element} for p in params} \
            if flat_state else {}
        return {"kind": "flat", "master": master, "moments": moments, "scalars": scalars, "keys": per_element}

    def _restore_optimizer_state(self, carried: dict[str, Any]) -> None:
        if carried["kind"] == "per_param":
            inner, pairs = self._master_pairs()
            for p, master in pairs:
                fp32, state = carried["state"].get(p, (None, None))
                if fp32 is not None:
                    master.data.copy_(fp32)
                if state is not None:
                    inner.state[master] = state
            return
        opt = self.optimizer
        for p, value in carried["master"].items():
            safe_set_full_fp32_param(p, value)
        if not carried["moments"]:
            return
        inner = opt.optimizer
        for flat in _flat_partitions(opt):
            inner.state[flat] = {**{k: (v.clone() if torch.is_tensor(v) else v) for k, v in carried["scalars"].items()},
                                 **{k: torch.zeros_like(flat) for k in carried["keys"]}}
        if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
            opt._hp_optimizer_states_linked = False
            opt._lazy_init_hp_params_optimizer_state()
        for p, states in carried["moments"].items():
            for key, value in states.items():
                safe_set_full_optimizer_state(p, value, key)

    # ------------------------------------------------------------------ checkpoints
    def autofreeze_state_dict(self) -> dict[str, Any]:
        return {"num_frozen_blocks": self.num_frozen_blocks, "freeze_events": self.freeze_events,
                "world_size": dist.get_world_size() if dist.is_initialized() else 1,
                "decider": self.decider.state_dict() if self.decider else {},
                "cache": self.cache.manifest() if self.cache else None,
                "config": self.autofreeze_config.model_dump(mode="json")}

    def save_checkpoint(self, save_dir: str, tag: Optional[str] = None, client_state: Optional[dict] = None,
                        save_latest: bool = True, exclude_frozen_parameters: bool = False) -> bool:
        tag = tag if tag is not None else f"global_step{self.global_steps}"
        tag_dir = os.path.join(save_dir, str(tag))
        os.makedirs(tag_dir, exist_ok=True)
        if self.cache is not None:
            self.cache.flush()  # the manifest recorded below must describe what is on disk
        # Our state goes in before DeepSpeed writes 'latest', so a 'latest' tag is always complete.
        if self.global_rank == 0:
            write_json(os.path.join(tag_dir, STATE_FILE), self.autofreeze_state_dict())
        if self._grad_acc is not None:
            path = os.path.join(tag_dir, GRAD_ACC_FILE.format(rank=self.global_rank))
            torch.save(self._grad_acc, path + ".tmp")
            os.replace(path + ".tmp", path)
        if dist.is_initialized():
            dist.barrier()
        return super().save_checkpoint(save_dir, tag=tag, client_state=client_state or {},
                                       save_latest=save_latest, exclude_frozen_parameters=exclude_frozen_parameters)

    def load_checkpoint(self, load_dir: str, tag: Optional[str] = None, **kwargs: Any) -> tuple[Optional[str], dict]:
        if tag is None:
            with open(os.path.join(load_dir, "latest")) as f:
                tag = f.read().strip()
        tag_dir = os.path.join(load_dir, str(tag))
        with open(os.path.join(tag_dir, STATE_FILE)) as f:
            state = json.load(f)
        # The optimizer must have the checkpoint's shape (the same trainable set) before
        # DeepSpeed loads its partitions into it.
        if state["num_frozen_blocks"] > self.num_frozen_blocks:
            self.freeze_and_repartition(state["num_frozen_blocks"])
        path, client_state = super().load_checkpoint(load_dir, tag=tag, **kwargs)
        self.freeze_events = state["freeze_events"]
        if self.cache is not None and self.num_frozen_blocks:
            # The store is named after the frozen weights: the loaded ones, not those before the load.
            self.cache.set_boundary(self.num_frozen_blocks, self._frozen_weights_fingerprint())
            if state.get("cache"):
                previous = state["cache"].get("previous")
                self.cache.restore(state["cache"], previous and self._frozen_weights_fingerprint(previous["boundary"]))
        if self.decider is not None:
            self.decider.load_state_dict(state["decider"])
            if self._grad_acc is not None:
                self._grad_acc.copy_(self._saved_grad_acc(tag_dir, state.get("world_size", 1)))
        return path, client_state

    def _saved_grad_acc(self, tag_dir: str, saved_world: int) -> torch.Tensor:
        """This rank's gradient sums since the last decision. On another world size every rank
        starts from the saved ranks' mean: the decision averages over ranks, so it is unchanged."""
        world = dist.get_world_size() if dist.is_initialized() else 1
        ranks = [self.global_rank] if saved_world == world else range(saved_world)
        sums = [torch.load(os.path.join(tag_dir, GRAD_ACC_FILE.format(rank=r)), map_location="cpu", weights_only=True)
                for r in ranks]
        return torch.stack(sums).mean(0) if len(sums) > 1 else sums[0]

    def _load_zero_checkpoint(self, load_dir: str, tag: str, load_optimizer_states: bool = True) -> bool:
        # DeepSpeed refuses ZeRO-1/2 optimizer state saved on another data-parallel size. The
        # files hold each rank's flat partition and where every parameter's fragment lies in it
        # (param_slice_mappings): stitch each trainable parameter's full master weight and
        # moments back together and hand them to this world's partitions.
        if self.loaded_checkpoint_dp_world_size == self.seq_dp_world_size:
            return super()._load_zero_checkpoint(load_dir, tag, load_optimizer_states=load_optimizer_states)
        if self.zero_optimization_partition_weights():
            raise ConfigError(f"{os.path.join(load_dir, tag)}: saved on {self.loaded_checkpoint_dp_world_size} ranks; "
                              f"a ZeRO-3 checkpoint resumes on the same world size only ({self.seq_dp_world_size} "
                              "now). Convert it with DeepSpeed's ds_to_universal, or train with ZeRO-1/2 to re-pack")
        names = self._get_all_zero_checkpoint_names(load_dir, tag, self.bfloat16_enabled())
        fragments: dict[str, dict[str, list[torch.Tensor]]] = {}
        scalars: dict[str, Any] = {}
        param_groups: list[dict] = []
        for name in names:  # dp rank order: a parameter's fragments follow each other
            saved = torch.load(name, map_location="cpu", weights_only=False)["optimizer_state_dict"]
            base = saved["base_optimizer_state"]
            param_groups = param_groups or base["param_groups"]
            for group, (mapping, fp32) in enumerate(zip(saved["param_slice_mappings"],
                                                        saved["single_partition_of_fp32_groups"])):
                state = base["state"].get(group, {})
                flat = {"fp32": fp32, **{k: v for k, v in state.items() if torch.is_tensor(v) and v.dim() == 1}}
                scalars = scalars or {k: v for k, v in state.items() if k not in flat}
                for pname, frag in mapping.items():
                    for key, tensor in flat.items():
                        fragments.setdefault(pname, {}).setdefault(key, []).append(
                            tensor.narrow(0, frag.start, frag.numel))
        if not fragments:
            raise RuntimeError(f"{os.path.join(load_dir, tag)}: the ZeRO checkpoint has no parameter mappings "
                               "(saved by a DeepSpeed too old to reshard)")
        master, moments = {}, {}
        for pname, p in self.module.named_parameters():
            if not p.requires_grad:
                continue
            if pname not in fragments:
                raise RuntimeError(f"{os.path.join(load_dir, tag)}: no optimizer state for trainable parameter {pname}")
            full = {key: torch.cat(parts).view(p.shape).to(self.device) for key, parts in fragments[pname].items()}
            master[p] = full.pop("fp32")
            moments[p] = full
        keys = sorted(next(iter(moments.values())).keys()) if load_optimizer_states else []
        self._restore_optimizer_state({"kind": "flat", "master": master, "scalars": scalars, "keys": keys,
                                       "moments": moments if load_optimizer_states else {}})
        if load_optimizer_states:
            # Hyperparameters the scheduler moved (lr) come with the state, as in DeepSpeed's own load.
            for group, saved_group in zip(self.optimizer.param_groups, param_groups):
                group.update({k: v for k, v in saved_group.items() if k != "params"})
        return True


def _numel(p: torch.nn.Parameter) -> int:
    return getattr(p, "ds_numel", p.numel())  # ZeRO-3 parameters hold only their partition


def _accumulate_into(acc: torch.Tensor):
    def hook(grad: torch.Tensor) -> None:
        acc.add_(grad.float())  # returns nothing: a tensor hook's return value would replace the gradient
    return hook


def _trainable_groups(groups: list[dict]) -> tuple[list[dict], list[int]]:
    """The groups restricted to trainable parameters, empty ones dropped (DeepSpeed drops them
    too), and the index of each kept group among ``groups``."""
    kept, origins = [], []
    for origin, group in enumerate(groups):
        trainable = [p for p in group["params"] if p.requires_grad]
        if trainable:
            kept.append(dict(group, params=trainable))
            origins.append(origin)
    return kept, origins


def write_json(path: str, obj: Any) -> None:
    """``obj`` as JSON at ``path``, durably: a reader sees the old file or the whole new one."""
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def initialize(args: Any = None,
               model: Optional[torch.nn.Module] = None,
               optimizer: Any = None,
               model_parameters: Any = None,
               training_data: Any = None,
               lr_scheduler: Any = None,
               distributed_port: int = deepspeed.constants.TORCH_DISTRIBUTED_DEFAULT_PORT,
               mpu: Any = None,
               dist_init_required: Optional[bool] = None,
               collate_fn: Any = None,
               config: Optional[Union[str, dict]] = None,
               config_params: Optional[Union[str, dict]] = None) -> tuple[AutoFreezeEngine, Any, Any, Any]:
    """Like ``deepspeed.initialize`` but returns an :class:`AutoFreezeEngine`.

    The ``"autofreeze"`` section of the DeepSpeed config is validated first, so a bad key fails
    before any process group or model work starts.
    """
    if model is None:
        raise ValueError("ds_autofreeze.initialize requires a model")
    config = config if config is not None else config_params
    if getattr(args, "deepspeed_config", None) is not None:
        if config is not None:
            raise ValueError("pass the DeepSpeed config either as args.deepspeed_config or as config, not both")
        config = args.deepspeed_config
    if config is None:
        raise ValueError("ds_autofreeze.initialize requires a DeepSpeed config (config= or --deepspeed_config)")
    if not isinstance(config, dict):
        config = load_ds_config(config)
    autofreeze = get_autofreeze_config(config)
    if autofreeze.enabled and (optimizer is not None or "optimizer" not in config):
        raise ConfigError("autofreeze: the optimizer must come from the DeepSpeed config's 'optimizer' section "
                          "(it is rebuilt at every freeze), not from the optimizer argument")
    ModelAdapter(model)  # fail on an unsupported architecture before distributed init

    dist.init_distributed(dist_backend=deepspeed.get_accelerator().communication_backend_name(),
                          distributed_port=distributed_port, dist_init_required=dist_init_required)
    config_class = DeepSpeedConfig(config, mpu)
    if config_class.hybrid_engine.enabled:
        raise ConfigError("autofreeze: hybrid_engine is not supported")
    deepspeed.zero.partition_parameters.shutdown_init_context()
    engine = AutoFreezeEngine(args=args, model=model, optimizer=optimizer, model_parameters=model_parameters,
                              training_data=training_data, lr_scheduler=lr_scheduler, mpu=mpu,
                              dist_init_required=dist_init_required, collate_fn=collate_fn, config=config,
                              config_class=config_class, autofreeze=autofreeze)
    deepspeed.zero.partition_parameters.restore_init_context()
    engine._configure_python_gc()
    return engine, engine.optimizer, engine.training_dataloader, engine.lr_scheduler


def _unpadded_lengths(attention_mask: torch.Tensor) -> list[int]:
    """Per row entering the blocks, the positions up to its last unmasked one (right padding
    trimmed; a left-padded row keeps its full length)."""
    mask = attention_mask.reshape(-1, attention_mask.shape[-1]) != 0
    trailing = mask.flip(-1).int().cumsum(-1).eq(0).sum(-1)
    return (mask.shape[-1] - trailing).clamp(min=1).tolist()


def _padded(entries: list[torch.Tensor], seq_len: int, device: torch.device) -> torch.Tensor:
    """Stack (L, H) entries into (rows, seq_len, H), zeros past each L: one copy per entry."""
    out = torch.zeros(len(entries), seq_len, *entries[0].shape[1:], dtype=entries[0].dtype, device=device)
    for row, e in enumerate(entries):
        out[row, :e.shape[0]] = e
    return out
