"""AutoFreeze on any DeepSpeed engine: ``attach(engine, config)``, and ``initialize`` (deepspeed.initialize + attach).

    engine, optimizer, _, lr_scheduler = deepspeed.initialize(model=model, config=ds_config, ...)
    af = ds_autofreeze.attach(engine, ds_config.get("autofreeze"))   # or None: freeze by hand only
    for batch in loader:
        loss = engine(**batch, example_ids=ids).loss   # example_ids: only with the activation cache
        engine.backward(loss)
        engine.step()
        af.after_step()                                 # decide, and repartition if blocks freeze

The engine stays DeepSpeed's own (Hugging Face Trainer and accelerate build theirs with
``deepspeed.initialize``). ``AutoFreeze`` composes the parts, each in one place: the decision
(``controller.FreezeController``), the repartition (``repartition.Repartitioner``: the only code
touching DeepSpeed internals, probed here at attach), the frozen prefix's output for the forward
(``frozen_prefix.FrozenPrefix``: cache path and ZeRO-3 replicated weights, hooks on the model) and
its checkpoint files (``checkpoint``). ``engine.save_checkpoint`` / ``load_checkpoint`` carry its
state: they are wrapped on this engine instance (nothing is patched globally), and ``close()`` puts
them back.
"""
from __future__ import annotations

import functools
import inspect
import math
import os
from typing import Any, Callable, Mapping, Optional, Union

import deepspeed
import torch
from deepspeed import comm as dist
from deepspeed.runtime.tensor_parallel.init_utils import load_ds_config

from .cache import ActivationCache
from .checkpoint import read_gradient_sums, read_state, resolve_tag, save_state
from .config import AUTOFREEZE, AutoFreezeConfig, ConfigError, get_autofreeze_config
from .controller import FreezeController
from .deciders import Decider, IntervalDecider
from .frozen_prefix import FrozenPrefix
from .model_adapter import ModelAdapter
from .repartition import Repartitioner
from .statistics import adam_moments


class AutoFreeze:
    """AutoFreeze attached to one DeepSpeed engine (see the module doc)."""

    def __init__(self, engine: Any, config: Union[AutoFreezeConfig, Mapping[str, Any], None] = None):
        self.config = _as_config(config)
        self.engine = engine
        self.adapter = ModelAdapter(engine.module)
        self.repartitioner = Repartitioner(engine)  # refuses an engine it could not repartition, now
        self.controller: Optional[FreezeController] = None
        if self.config.enabled:  # before anything hooks the model: the decider may refuse the optimizer
            self.controller = FreezeController(self.config, self.adapter, engine.optimizer, engine.lr_scheduler,
                                               engine.device)
            self.controller.bind(engine.optimizer)
        zero3 = bool(engine.zero_optimization_partition_weights())
        self.prefix = FrozenPrefix(self.adapter, zero3, self.config.replicate_frozen_weights,
                                   lambda params: deepspeed.zero.GatheredParameters(params, enabled=zero3))
        self.freeze_events: list[dict[str, Any]] = []
        self.repartition_seconds: list[float] = []
        # Called after every freeze with the new boundary. The engine's optimizer is then a new
        # object (the old one is emptied): whoever else holds it (a Trainer's wrappers) re-points here.
        self.freeze_listeners: list[Callable[[int], None]] = []
        self._cache_manifest: Optional[dict] = None  # from a checkpoint loaded before a cache was attached
        # rescale_from "interval": Adam's step and second moments per freeze unit at the last decision.
        self._moments_at_decision: Optional[tuple[int, list[float]]] = None
        self._step = engine.global_steps
        self._originals = {name: getattr(engine, name) for name in ("save_checkpoint", "load_checkpoint",
                                                                     "_load_zero_checkpoint")}
        engine.save_checkpoint = self.save_checkpoint
        engine.load_checkpoint = self.load_checkpoint
        engine._load_zero_checkpoint = self._load_zero_checkpoint
        if self.controller is not None:
            self._decide()  # a static decider freezes before the first step

    # ------------------------------------------------------------------ public surface
    @property
    def num_blocks(self) -> int:
        return self.adapter.num_blocks

    @property
    def num_frozen_blocks(self) -> int:
        return self.adapter.num_frozen

    @property
    def decider(self) -> Optional[Decider]:
        return self.controller.decider if self.controller is not None else None

    @property
    def cache(self) -> Optional[ActivationCache]:
        return self.prefix.cache

    def none_frozen(self) -> Optional[str]:
        """Why nothing froze, for a run's summary: set when a decider reading statistics ran and froze
        nothing (a user who turned AutoFreeze on must not mistake that for a fast run)."""
        if isinstance(self.decider, IntervalDecider) and not self.num_frozen_blocks:
            return self.decider.none_frozen()
        return None

    def freeze_summary(self, decisions_in: str) -> str:
        """The freezes for a run's summary ("step 126 -> 2, ..."), or "none" and why, pointing to
        where the run wrote each decision (``decisions_in``)."""
        events = ", ".join(f"step {e['step']} -> {e['frozen_blocks']}" for e in self.freeze_events) or "none"
        if why := self.none_frozen():
            events += f" ({why}; each decision's statistics are in {decisions_in})"
        return events

    def trainable_parameter_count(self) -> int:
        return sum(getattr(p, "ds_numel", p.numel()) for p in self.engine.module.parameters() if p.requires_grad)

    def training_state_bytes(self) -> dict[str, int]:
        """Bytes this rank holds beyond the model weights: fp32 masters, optimizer moments, gradients."""
        return self.repartitioner.training_state_bytes()

    def after_step(self) -> None:
        """Call after ``engine.step()``: at a new optimizer step, let the decider decide and apply it."""
        if self.engine.global_steps != self._step:
            self._step = self.engine.global_steps
            if self.controller is not None:
                self._decide()

    def freeze(self, num_frozen_blocks: int) -> None:
        """Freeze embeddings + blocks[:num_frozen_blocks] and rebuild the optimizer over the rest.

        Collective: every rank must call it at the same step with the same argument. A decider's
        statistics start a new interval."""
        if num_frozen_blocks == self.num_frozen_blocks:
            return
        if not self.num_frozen_blocks < num_frozen_blocks < self.num_blocks:
            raise ValueError(f"num_frozen_blocks must grow and leave a block trainable: "
                             f"{self.num_frozen_blocks} -> {num_frozen_blocks} of {self.num_blocks}")
        if self.config.rescale_clipping:
            self._rescale_clipping(self.num_frozen_blocks, num_frozen_blocks)
        if self.controller is not None:
            self.controller.release()  # its sums view the old partitions, which must be freed
        self.adapter.set_frozen(num_frozen_blocks)
        frozen = {id(p) for m in self.adapter.frozen_modules(num_frozen_blocks) for p in m.parameters()}
        self.repartition_seconds.append(self.repartitioner.rebuild(frozen))
        if self.controller is not None:
            self.controller.bind(self.engine.optimizer)
        self.prefix.set_boundary(num_frozen_blocks)
        for listener in self.freeze_listeners:
            listener(num_frozen_blocks)

    def _rescale_clipping(self, old: int, new: int) -> None:
        """Scale the clipping threshold by sqrt(the staying share of the squared gradient norm), so the
        blocks that stay are clipped as they were (config.rescale_clipping). Adam's second moments give
        the shares (config.rescale_from: as they are, or their change since the last decision);
        clipping scales every parameter of a step alike, so the shares are those of the raw norm."""
        clip = self.repartitioner.gradient_clipping
        if clip <= 0:
            return
        reading = self._second_moments()
        if reading is None:
            return  # no step yet, or no Adam state: nothing to say what full fine-tuning would clip
        step, v = reading
        if self.config.rescale_from == "interval" and self._moments_at_decision is not None \
                and self._moments_at_decision[0] < step:
            # v_t - b2^K v_(t-K) = (1 - b2) sum_(i<K) b2^i g_(t-i)^2: the last K steps alone.
            (then_step, then), b2 = self._moments_at_decision, self._adam_beta2()
            v = [now - b2 ** (step - then_step) * old_v for now, old_v in zip(v, then)]
        self._moments_at_decision = reading
        staying, total = sum(v[new:]), sum(v[old:])
        if total > 0 and staying > 0:
            self.repartitioner.gradient_clipping = clip * math.sqrt(min(1.0, staying / total))

    @functools.cached_property
    def _freeze_units(self) -> dict[int, int]:
        """Parameter id -> freeze unit: unit b < num_blocks is what freezing b + 1 blocks adds (block b;
        with block 0 the embeddings and shared modules), unit num_blocks what never freezes (the head)."""
        units: dict[int, int] = {}
        for b in range(self.num_blocks):
            for module in self.adapter.frozen_modules(b + 1):
                units.update({id(p): b for p in module.parameters() if id(p) not in units})
        units.update({id(p): self.num_blocks for _, params in self.repartitioner.groups for p in params
                      if id(p) not in units})
        return units

    def _second_moments(self) -> Optional[tuple[int, list[float]]]:
        """Adam's step and the sum of its second moments per freeze unit, not bias-corrected (the
        units share a step, so the shares are the same either way), summed over the ranks."""
        n = self.num_blocks + 1
        _, v, _, step = adam_moments(self.repartitioner.layout, self._freeze_units, n, [True] * n)
        if v is None or step is None:
            return None
        correction = 1 - self._adam_beta2() ** step
        return step, [x * correction for x in v]

    def _adam_beta2(self) -> float:
        return self.repartitioner.layout.inner.param_groups[0]["betas"][1]

    def pad_prefix_to(self, length: int, pad_id: int = 0) -> None:
        """Batches are padded to their own longest row (dynamic padding): run the frozen prefix at
        ``length`` (the longest any batch can be) and cut its output to the batch, so a row's frozen
        output does not depend on the batch it came in and the cache stays exact."""
        self.prefix.canonical_length, self.prefix.pad_id = length, pad_id

    def set_probe(self, batch: dict[str, torch.Tensor]) -> None:
        """This rank's shard of the drift statistic's probe set (the same number of rows on every rank)."""
        if self.controller is not None:
            self.controller.set_probe(batch)

    def attach_cache(self, cache: ActivationCache) -> None:
        """Serve the frozen prefix's output from ``cache`` in training forwards that pass
        ``example_ids``; the cache follows every boundary move from now on. A checkpoint loaded
        before this call is restored into it now (the same result as loading after)."""
        self.prefix.attach_cache(cache)
        if self._cache_manifest is not None:
            self._restore_cache(self._cache_manifest)
            self._cache_manifest = None

    def state_dict(self) -> dict[str, Any]:
        return {"num_frozen_blocks": self.num_frozen_blocks, "freeze_events": self.freeze_events,
                "world_size": dist.get_world_size() if dist.is_initialized() else 1,
                "decider": self.controller.state_dict() if self.controller else {},
                "cache": self.cache.manifest() if self.cache else None,
                "gradient_clipping": self.repartitioner.gradient_clipping,
                "moments_at_decision": self._moments_at_decision,
                "config": self.config.model_dump(mode="json")}

    def close(self) -> None:
        """Detach: the engine's checkpoint methods and the model's forward are DeepSpeed's again; the
        statistics hooks and the cache's threads end. The frozen blocks stay frozen."""
        for name, original in self._originals.items():
            if getattr(self.engine, name) == getattr(self, name):
                setattr(self.engine, name, original)
        self._originals = {}
        if self.controller is not None:
            self.controller.close()
        if self.cache is not None:
            self.cache.close()
        self.prefix.close()

    def __enter__(self) -> "AutoFreeze":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ decisions
    def _decide(self) -> None:
        step = self.engine.global_steps
        new = self.controller.decide(step, self.num_frozen_blocks)
        if new <= self.num_frozen_blocks:
            if self.config.rescale_clipping and self.config.rescale_from == "interval" \
                    and self.decider.is_decision_step(step) and self.repartitioner.gradient_clipping > 0:
                self._moments_at_decision = self._second_moments()  # what the next freeze differences with
            return
        self.freeze(new)
        event = {"step": step, "frozen_blocks": new, "trainable_params": self.trainable_parameter_count(),
                 "repartition_seconds": round(self.repartition_seconds[-1], 4),
                 "gradient_clipping": round(self.repartitioner.gradient_clipping, 6)}
        self.freeze_events.append(event)
        if self.config.log_freezes and self.engine.global_rank == 0:
            print(f"[autofreeze] step {step}: froze blocks 0..{new - 1} of {self.num_blocks} "
                  f"(trainable params {event['trainable_params']:,}, "
                  f"repartition {event['repartition_seconds']:.2f}s"
                  + (f", gradient clipping {event['gradient_clipping']:.4g}" if event["gradient_clipping"] else "")
                  + ")", flush=True)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, save_dir: str, tag: Optional[str] = None, *args: Any, **kwargs: Any) -> Any:
        """DeepSpeed's save_checkpoint, with AutoFreeze's state in the same tag directory first."""
        engine = self.engine
        tag = str(tag) if tag is not None else f"global_step{engine.global_steps}"
        if self.cache is not None:
            self.cache.flush()  # the manifest recorded below must describe what is on disk
        save_state(os.path.join(save_dir, tag), engine.global_rank,
                   self.state_dict() if engine.global_rank == 0 else None,
                   self.controller.interval_state() if self.controller is not None else None)
        if dist.is_initialized():
            dist.barrier()
        return self._originals["save_checkpoint"](save_dir, tag, *args, **kwargs)

    def load_checkpoint(self, load_dir: str, tag: Optional[str] = None, **kwargs: Any) -> Any:
        """DeepSpeed's load_checkpoint: the saved boundary is frozen first (the optimizer must have
        the checkpoint's shape before DeepSpeed loads its partitions), then AutoFreeze's state."""
        tag = resolve_tag(load_dir, tag)
        tag_dir = os.path.join(load_dir, tag)
        state = read_state(tag_dir)
        if state is not None and state["num_frozen_blocks"] > self.num_frozen_blocks:
            self.freeze(state["num_frozen_blocks"])
        result = self._originals["load_checkpoint"](load_dir, tag=tag, **kwargs)
        self._step = self.engine.global_steps
        self.repartitioner.after_load()
        self.prefix.weights_loaded()
        if state is None:
            return result
        self.freeze_events = state["freeze_events"]
        if self.config.rescale_clipping and "gradient_clipping" in state:  # as rescaled before the save
            self.repartitioner.gradient_clipping = state["gradient_clipping"]
            if state.get("moments_at_decision"):  # summed over the ranks: valid on any world size
                self._moments_at_decision = tuple(state["moments_at_decision"])
        if state.get("cache"):
            if self.cache is not None:
                self._restore_cache(state["cache"])
            else:
                self._cache_manifest = state["cache"]
        if self.controller is not None:
            self.controller.load_state_dict(state["decider"])
            world = dist.get_world_size() if dist.is_initialized() else 1
            sums = read_gradient_sums(tag_dir, self.engine.global_rank, self.engine.device) \
                if state.get("world_size", 1) == world else None
            self.controller.load_interval_state(sums)
            if self.decider.interval is None:
                self._decide()  # a schedule resumed past one of its steps freezes now
        return result

    def _restore_cache(self, manifest: dict) -> None:
        """The store is named after the frozen weights: the loaded ones, not those before the load."""
        if not self.num_frozen_blocks:
            return
        self.prefix.set_boundary(self.num_frozen_blocks)
        previous = manifest.get("previous")
        self.cache.restore(manifest, previous and self.prefix.fingerprint(previous["boundary"]))

    def _load_zero_checkpoint(self, load_dir: str, tag: str, load_optimizer_states: bool = True) -> bool:
        # ZeRO-1/2 state saved on another world size is resharded; otherwise DeepSpeed's own load.
        if self.repartitioner.load_resharded(load_dir, tag, load_optimizer_states):
            return True
        return self._originals["_load_zero_checkpoint"](load_dir, tag, load_optimizer_states=load_optimizer_states)


def _as_config(config: Union[AutoFreezeConfig, Mapping[str, Any], None]) -> AutoFreezeConfig:
    if config is None:
        return AutoFreezeConfig(enabled=False)
    if isinstance(config, AutoFreezeConfig):
        return config
    return get_autofreeze_config({AUTOFREEZE: config})


def attach(engine: Any, config: Union[AutoFreezeConfig, Mapping[str, Any], None] = None) -> AutoFreeze:
    """AutoFreeze on ``engine`` (from ``deepspeed.initialize``), configured by the ``"autofreeze"``
    section (a dict, or None to freeze by hand only with ``freeze(k)``). Refuses here, with one
    error naming each problem, an engine a freeze could not repartition."""
    return AutoFreeze(engine, config)


@functools.wraps(deepspeed.initialize)
def initialize(*args: Any, **kwargs: Any) -> tuple[Any, Any, Any, Any, AutoFreeze]:
    """``deepspeed.initialize`` (same arguments) + ``attach`` with the config's ``"autofreeze"``
    section: returns ``(engine, optimizer, dataloader, lr_scheduler, autofreeze)``. The section is
    validated and the model checked before DeepSpeed starts. The optimizer is rebuilt at each freeze:
    use ``engine.optimizer``, not the returned one, after a freeze."""
    bound = inspect.signature(deepspeed.initialize).bind(*args, **kwargs).arguments
    config = bound.get("config") if bound.get("config") is not None else bound.get("config_params")
    if config is None and getattr(bound.get("args"), "deepspeed_config", None) is not None:
        config = bound["args"].deepspeed_config
    if config is None:
        raise ConfigError("ds_autofreeze.initialize requires a DeepSpeed config (config= or --deepspeed_config)")
    section = get_autofreeze_config(config if isinstance(config, Mapping) else load_ds_config(config))
    if bound.get("model") is None:
        raise ValueError("ds_autofreeze.initialize requires a model")
    ModelAdapter(bound["model"])  # fail on an unsupported architecture before distributed init
    engine, optimizer, dataloader, lr_scheduler = deepspeed.initialize(*args, **kwargs)
    return engine, optimizer, dataloader, lr_scheduler, attach(engine, section)
