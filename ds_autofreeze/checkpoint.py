"""AutoFreeze's files in a DeepSpeed checkpoint tag directory, written before DeepSpeed's own.

- ``autofreeze_state.json`` (rank 0): the boundary, freeze events, the decider's state (its log
  included), the cache manifest, the world size and the resolved config: what a resumed run needs to
  continue exactly where the saved one was.
- ``autofreeze_grad_sums_rank{r}.pt`` (each rank): its statistics' sums since the last decision
  (gradient moments, update progress), laid out over its own optimizer partition (a tensor file:
  torch.load with weights_only).
Both are written before DeepSpeed writes ``latest``, so a tag that ``latest`` names is complete.
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional

import torch

STATE_FILE = "autofreeze_state.json"
GRAD_SUMS_FILE = "autofreeze_grad_sums_rank{rank}.pt"


def write_json(path: str, obj: Any) -> None:
    """``obj`` as JSON at ``path``, durably: a reader sees the old file or the whole new one."""
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def resolve_tag(load_dir: str, tag: Optional[str]) -> str:
    """``tag``, or the one ``load_dir/latest`` names (as DeepSpeed resolves it)."""
    if tag is not None:
        return str(tag)
    with open(os.path.join(load_dir, "latest")) as f:
        return f.read().strip()


def save_state(tag_dir: str, rank: int, state: Optional[dict[str, Any]], gradient_sums: Optional[dict]) -> None:
    """This rank's part: the state (rank 0 passes it, the others None) and its gradient sums."""
    os.makedirs(tag_dir, exist_ok=True)
    if state is not None:
        write_json(os.path.join(tag_dir, STATE_FILE), state)
    if gradient_sums is not None:
        path = os.path.join(tag_dir, GRAD_SUMS_FILE.format(rank=rank))
        torch.save(gradient_sums, path + ".tmp")
        os.replace(path + ".tmp", path)


def read_state(tag_dir: str) -> Optional[dict[str, Any]]:
    """The saved state, or None for a checkpoint written without AutoFreeze."""
    path = os.path.join(tag_dir, STATE_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def read_gradient_sums(tag_dir: str, rank: int, device: torch.device) -> Optional[dict]:
    path = os.path.join(tag_dir, GRAD_SUMS_FILE.format(rank=rank))
    if not os.path.isfile(path):
        return None
    return torch.load(path, map_location=device, weights_only=True)
