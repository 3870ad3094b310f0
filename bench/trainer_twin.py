"""launch/trainer.py made to train exactly as ``launch/finetune.py --pad_to_max_length`` does, so the
two paths' freeze decisions compare on the same training (``python bench/trainer.py --twin``).

    DS_ACCELERATOR=cpu python bench/trainer_twin.py --deepspeed_config <the Trainer JSON without "optimizer"> \
        --optim adamw_torch ...   # launch/trainer.py's arguments

By default the paths differ in three ways, each a choice of its own path (not of AutoFreeze); the
twin takes the launcher's side of each:

- Batches: the launcher's per-epoch order (``epoch_steps``), not the Trainer's sampler.
- Dropout stream: the Trainer reseeds in its ``__init__``, after the model's new head is drawn, and
  its DataLoaders draw a seed from the global RNG at every pass; the launcher does neither. The twin
  keeps the RNG state across ``__init__`` and evaluation, and gives its training loader a generator.
- Parameter groups: with an "optimizer" section in its JSON the Trainer hands DeepSpeed one group
  (weight decay on biases and norms too). Without one it builds torch's AdamW with its own decay
  groups, which on BERT-class models are the launcher's; ``--optim adamw_torch`` is the plain
  (not fused) AdamW that DeepSpeed's ``torch_adam`` builds.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch"))

from trainer import Trainer, main  # noqa: E402  (launch/trainer.py)

from ds_autofreeze.data import epoch_steps  # noqa: E402


class LauncherBatches(torch.utils.data.Sampler):
    """The launcher's global batches of one process, epoch by epoch (``set_epoch``)."""

    def __init__(self, num_examples: int, seed: int, batch_size: int):
        self.num_examples, self.seed, self.batch_size, self.epoch = num_examples, seed, batch_size, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_examples // self.batch_size

    def __iter__(self) -> Iterator[list[int]]:
        return iter(epoch_steps(self.num_examples, self.seed, self.epoch, 1, self.batch_size))


class EpochLoader(DataLoader):
    # The Trainer sets the epoch on its loader (or on a sampler accelerate wrapped), not on a batch sampler.
    def set_epoch(self, epoch: int) -> None:
        self.batch_sampler.set_epoch(epoch)


class LauncherTwin(Trainer):
    def __init__(self, *args: Any, **kwargs: Any):
        # The Trainer's __init__ reseeds; the launcher's dropout stream goes on from the head's init.
        rng = torch.get_rng_state()
        super().__init__(*args, **kwargs)
        torch.set_rng_state(rng)

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        # The launcher's evaluation draws nothing from the RNG; the Trainer's DataLoader draws its workers' seed.
        rng = torch.get_rng_state()
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            torch.set_rng_state(rng)

    def get_train_dataloader(self) -> DataLoader:
        # One process: the batches go to the device in the Trainer's _prepare_inputs, no accelerate wrapper needed.
        collate = self._get_collator_with_removed_columns(self.data_collator, description="training")
        # Its own generator: a DataLoader draws a seed for its workers at every epoch, from the global
        # RNG (the dropout stream) unless it has one; the launcher draws nothing there.
        return EpochLoader(self.train_dataset, collate_fn=collate, generator=torch.Generator(),
                           batch_sampler=LauncherBatches(len(self.train_dataset), self.args.seed,
                                                         self._train_batch_size))


if __name__ == "__main__":
    main(trainer_class=LauncherTwin)
