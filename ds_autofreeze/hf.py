"""AutoFreeze under Hugging Face's Trainer with DeepSpeed: ``AutoFreezeCallback``.

    args = TrainingArguments(output_dir="out", deepspeed="configs/trainer_autofreeze_cache.json", ...)
    trainer = Trainer(model=model, args=args, train_dataset=ExampleIds(train_set))  # ExampleIds: for the cache
    trainer.add_callback(AutoFreezeCallback(trainer))  # it must hold the trainer: not Trainer(callbacks=[...])
    trainer.train()                                     # or train(resume_from_checkpoint=...)

The DeepSpeed config's ``"autofreeze"`` section configures it as for ``launch/finetune.py``, without
``total_steps``: that is the Trainer's ``state.max_steps``. Values the Trainer also sets (lr, betas,
eps, weight_decay, batch sizes, accumulation, clipping, the scheduler's warmup and total steps) must
be ``"auto"`` or equal to the TrainingArguments (``configs/trainer_autofreeze_cache.json``). A PEFT
(LoRA) model works as any other: a frozen block's adapters freeze with it.

Where it hooks in, and why there:

- Attach. The Trainer builds the DeepSpeedEngine inside ``trainer.accelerator.prepare`` and, when
  resuming, calls ``engine.load_checkpoint`` right after, before any callback event. A checkpoint
  saved after a freeze holds an optimizer over fewer parameters, so AutoFreeze must be attached
  by then (it then freezes to the saved boundary before DeepSpeed loads: ``AutoFreeze.load_checkpoint``).
  The callback holds the trainer and wraps ``prepare`` on this trainer's accelerator instance (no
  class is patched): AutoFreeze attaches to the engine as soon as it is built.
- Steps. ``af.after_step()`` in ``on_step_end``: accelerate's backward has run ``engine.step()``
  by then, and the Trainer logs and saves after it, so a checkpoint at that step has the freeze.
- References. A freeze rebuilds the optimizer and empties the old object. The Trainer reaches it
  through accelerate's ``DeepSpeedOptimizerWrapper`` (one object: ``trainer.optimizer``, the callback
  handler's, the accelerator's ``_optimizers``, and the scheduler wrapper's), re-pointed after
  every freeze (``AutoFreeze.freeze_listeners``); the scheduler wrapper's scheduler is the engine's,
  which the repartition re-points itself.
- Logs. Decisions and freezes (with the optimizer state left after the repartition) are logged
  through ``trainer.log`` under ``autofreeze/``, so they are in ``state.log_history`` and
  ``trainer_state.json``; a resumed run does not log again what its checkpoint's history holds.
- Checkpoints. The Trainer's ``save_checkpoint`` carries AutoFreeze's state (the engine's method is
  AutoFreeze's). For a PEFT model the Trainer would exclude frozen parameters from it; it does not
  here (AutoFreeze's method takes no such argument), as the adapters of frozen blocks must be saved.
- Cache. Entries are keyed by dataset index, so each training example must carry it:
  ``ExampleIds(dataset)`` adds ``example_ids`` to every item, and the callback keeps that column
  through the Trainer's ``remove_unused_columns``; AutoFreeze's forward hook pops it before the
  model sees it. The Trainer's sampler may shuffle freely (ids travel with the examples), but its
  order is not known ahead, so the disk tier is read without prefetch. Pad inputs to a fixed
  length (``padding="max_length"``): with per-batch padding, a token-level head's (QA) entries do
  not fit other batches, and cached == uncached holds only up to rounding. On several ranks the Trainer's sampler
  moves examples between ranks every epoch, so each rank's RAM tier holds about 1/world of what it
  is asked for (one rank is what runs here).
"""
from __future__ import annotations

import os
import warnings
from typing import Any, Collection, Optional

import torch
from deepspeed import DeepSpeedEngine
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .autofreeze import AutoFreeze, attach
from .cache import ActivationCache, crc32_of
from .config import AutoFreezeConfig, ConfigError, get_autofreeze_config
from .data import TokenizedDataset

EXAMPLE_IDS = "example_ids"


class ExampleIds(torch.utils.data.Dataset):
    """``dataset`` (map-style: ``dataset[i]`` a dict of model inputs, or a ``TokenizedDataset``) with
    each item's index added under ``example_ids``: the activation cache's key."""

    def __init__(self, dataset: Any):
        if isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__len__"):
            raise ConfigError("autofreeze.cache: an iterable dataset has no example indices to key the cache on; "
                              "use a map-style dataset, or set autofreeze.cache.enabled false")
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if isinstance(self.dataset, TokenizedDataset):
            item = {name: t[index] for name, t in self.dataset.tensors.items()}
        else:
            item = dict(self.dataset[index])
        item[EXAMPLE_IDS] = index
        return item

    @property
    def rows_per_example(self) -> int:
        """Rows each example enters the blocks as (multiple choice: one per choice)."""
        return int(torch.as_tensor(self[0]["input_ids"]).shape[:-1].numel())

    def fingerprint(self) -> str:
        """CRC32 of what the blocks read (the inputs ``TokenizedDataset.fingerprint`` covers), example by
        example: the cache's disk store is reused only for the same data."""
        tensors = []
        for i in range(len(self)):
            item = self[i]
            tensors += [torch.as_tensor(item[k]) for k in TokenizedDataset._BLOCK_INPUTS if k in item]
        return crc32_of(tensors)


class AutoFreezeCallback(TrainerCallback):
    """AutoFreeze for ``trainer``'s DeepSpeed engine (module doc):
    ``trainer.add_callback(AutoFreezeCallback(trainer))``.

    ``af`` is the ``AutoFreeze`` of the current ``train()`` call (None before the engine is built)."""

    def __init__(self, trainer: Trainer):
        plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
        if plugin is None:
            raise ConfigError("AutoFreezeCallback runs on DeepSpeed: pass TrainingArguments(deepspeed=<a config "
                              "with an 'autofreeze' section>)")
        self.trainer = trainer
        self.af: Optional[AutoFreeze] = None
        # Bad keys fail now, before training. (accelerate refuses "auto" in a section it does not know:
        # total_steps is left out, and filled at attach.)
        self.config: AutoFreezeConfig = get_autofreeze_config(plugin.hf_ds_config.config)
        self._cached = self.config.enabled and self.config.cache.enabled
        if self._cached:
            self._keep_example_ids()
        self._check_handle: Any = None
        self._optimizer: Any = None  # the engine optimizer the Trainer's wrappers were last pointed at
        self._decisions_logged = self._freezes_logged = 0  # entries of af's lists logged so far
        prepare = trainer.accelerator.prepare

        def prepare_and_attach(*args: Any, **kwargs: Any) -> Any:
            result = prepare(*args, **kwargs)
            for obj in result if isinstance(result, tuple) else (result,):
                # An engine without optimizer is ZeRO-3 inference (evaluate before train): nothing to freeze.
                if isinstance(obj, DeepSpeedEngine) and obj.optimizer is not None:
                    self._attach(obj)
            return result

        trainer.accelerator.prepare = prepare_and_attach

    # ------------------------------------------------------------------ setup
    def _keep_example_ids(self) -> None:
        trainer = self.trainer
        if not isinstance(trainer.train_dataset, ExampleIds):
            raise ConfigError("autofreeze.cache.enabled: the cache is keyed by dataset index, which the Trainer does "
                              "not pass to the model: train on ds_autofreeze.hf.ExampleIds(train_dataset), or set "
                              "autofreeze.cache.enabled false")
        if trainer.args.remove_unused_columns:
            # The Trainer keeps only the columns the model's forward names (Trainer._signature_columns);
            # AutoFreeze's forward hook pops example_ids before the model sees it.
            trainer._set_signature_columns_if_needed()
            if EXAMPLE_IDS not in trainer._signature_columns:
                trainer._signature_columns.append(EXAMPLE_IDS)

    def _attach(self, engine: DeepSpeedEngine) -> None:
        trainer = self.trainer
        if self not in trainer.callback_handler.callbacks:
            raise RuntimeError("AutoFreezeCallback(trainer) was built but not added: trainer.add_callback(it)")
        if self.af is not None:
            self.af.close()  # an earlier train() call's engine
        config = self.config.model_copy(deep=True)
        if config.enabled and config.total_steps is None:
            config.total_steps = trainer.state.max_steps
        self._optimizer = engine.optimizer
        self.af = attach(engine, config)
        self._decisions_logged = self._freezes_logged = 0
        self.af.freeze_listeners.append(self._follow)
        self._follow(self.af.num_frozen_blocks)  # a static decider froze at attach
        if self._cached:
            dataset = trainer.train_dataset
            cache = self.config.cache
            self.af.attach_cache(ActivationCache(
                cache, cache.disk_dir or os.path.join(trainer.args.output_dir, "activation_cache"),
                len(dataset) * dataset.rows_per_example, data_fingerprint=dataset.fingerprint(),
                writer=f"rank{trainer.args.process_index}"))
            self._require_example_ids(engine.module)

    def _require_example_ids(self, model: torch.nn.Module) -> None:
        """A forward pre-hook ahead of AutoFreeze's (which serves the cache and pops ``example_ids``):
        a training batch must carry ``example_ids`` (a data collator may drop keys it does not know,
        and the cache would then silently never serve)."""
        if self._check_handle is not None:
            self._check_handle.remove()

        def check(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            if module.training and EXAMPLE_IDS not in kwargs and not self.af.prefix.computing:
                raise ConfigError("autofreeze.cache.enabled: a training batch came without example_ids; the "
                                  "data collator must pass on the example_ids of ExampleIds(train_dataset) (or set "
                                  "autofreeze.cache.enabled false)")

        self._check_handle = model.register_forward_pre_hook(check, with_kwargs=True, prepend=True)

    def _follow(self, _num_frozen: int) -> None:
        """The engine's optimizer is a new object: point the Trainer's wrappers of the old one at it."""
        trainer, new = self.trainer, self.af.engine.optimizer
        holders = [trainer.optimizer, trainer.callback_handler.optimizer, *trainer.accelerator._optimizers]
        for wrapper in {id(w): w for w in holders if w is not None}.values():
            if getattr(wrapper, "optimizer", None) is self._optimizer and self._optimizer is not new:
                wrapper.optimizer = new
                # DeepSpeedOptimizerWrapper reads the overflow flag through this, set once at its build.
                wrapper.__has_overflow__ = hasattr(new, "overflow")
        self._optimizer = new

    # ------------------------------------------------------------------ events
    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        if self.af is None:
            raise RuntimeError("AutoFreezeCallback: the Trainer built no DeepSpeed engine through its accelerator "
                               "(TrainingArguments(deepspeed=...) is required)")
        # A resumed run's history (from its checkpoint) holds the decisions and freezes before it;
        # what is new here (a static decider's freeze at step 0) is logged now.
        history = state.log_history
        self._log_new({h["step"] for h in history if any(k.startswith("autofreeze/decision/") for k in h)},
                      {h["step"] for h in history if "autofreeze/frozen_blocks" in h})

    def on_epoch_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        if self.af.cache is not None:
            # The epoch's order is the Trainer's sampler's, not known ahead: nothing to prefetch, but
            # the cache counts epochs (the previous boundary's store goes after a whole epoch).
            self.af.cache.plan_epoch([])

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        self.af.after_step()
        self._log_new()

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        af = self.af
        if af.cache is not None:
            self._log({f"autofreeze/cache/{k}": v for k, v in af.cache.stats.as_dict().items()})
        if (why := af.none_frozen()) and state.is_world_process_zero:
            warnings.warn(f"autofreeze: nothing froze. {why}; each decision is in the Trainer's log history "
                          "under autofreeze/decision/", stacklevel=2)
        # Ends the cache's threads (after writing what is queued) and the statistics hooks; the
        # frozen blocks stay frozen, and the optimizer stays the trainable share.
        af.close()
        if self._check_handle is not None:
            self._check_handle.remove()
            self._check_handle = None

    # ------------------------------------------------------------------ logs
    def _log_new(self, decided: Collection[int] = (), frozen: Collection[int] = ()) -> None:
        """Log the decisions and freezes not logged yet (those at steps in ``decided`` / ``frozen``
        are in the history already), one entry per step."""
        af = self.af
        decisions = af.decider.log if af.decider is not None else []
        by_step: dict[int, dict[str, float]] = {}
        for record in decisions[self._decisions_logged:]:
            if record["step"] not in decided:
                by_step.setdefault(record["step"], {}).update(decision_metrics(record))
        for event in af.freeze_events[self._freezes_logged:]:
            if event["step"] not in frozen:
                by_step.setdefault(event["step"], {}).update(
                    {"autofreeze/frozen_blocks": event["frozen_blocks"],
                     "autofreeze/trainable_params": event["trainable_params"],
                     "autofreeze/repartition_seconds": event["repartition_seconds"],
                     "autofreeze/gradient_clipping": event.get("gradient_clipping", 0.0)})
        self._decisions_logged, self._freezes_logged = len(decisions), len(af.freeze_events)
        for step in sorted(by_step):
            metrics = by_step[step]
            if "autofreeze/frozen_blocks" in metrics and step == af.engine.global_steps:
                # What the optimizer holds now, after the repartition (gradients: freed after a step).
                metrics.update({f"autofreeze/{k}_bytes": v for k, v in af.training_state_bytes().items()
                                if k != "gradients"})
            self._log(metrics)

    def _log(self, metrics: dict[str, float]) -> None:
        """``trainer.log``, leaving the Trainer's own logging of this step as it was: logging turns
        ``control.should_log`` off, which would drop the step's loss and learning-rate entry."""
        control = self.trainer.control
        should_log = control.should_log
        self.trainer.log(metrics)
        control.should_log = should_log


def decision_metrics(record: dict[str, Any]) -> dict[str, float]:
    """One decider log record as scalar metrics: ``autofreeze/decision/<key>``, and per block
    ``autofreeze/decision/<key>/block<i>`` for lists (blocks without a value are left out). Raw
    statistics and notes stay in ``af.decider.log`` and the checkpoint."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if key in ("step", "stats"):
            continue
        if isinstance(value, (bool, int, float)):
            out[f"autofreeze/decision/{key}"] = float(value)
        elif isinstance(value, list):
            out.update({f"autofreeze/decision/{key}/block{i}": float(v) for i, v in enumerate(value)
                        if isinstance(v, (int, float))})
    return out
