"""The frozen prefix's output, served to the model's forward: from the activation cache, or from a
replicated copy of the frozen weights (ZeRO-3), instead of running the frozen blocks.

``FrozenPrefix`` sits on the model itself (a forward pre-hook and an always-called forward hook
on ``engine.module``), not in an engine subclass, so it works with any engine ``deepspeed.initialize``
built. A training forward that passes ``example_ids`` (dataset indices of the batch's examples) gets
the hidden states entering the first trainable block from the cache; the model then runs from that
block (``ModelAdapter.run_from``). Misses are computed from the previous boundary's entries when there
are any (only the newly frozen blocks run), else from the embeddings, and stored.

ZeRO-3 partitions every weight and gathers it for each forward, frozen ones included (DeepSpeed
re-partitions every weight at each step). With ``replicate_frozen_weights`` the frozen modules are
gathered once at the freeze into plain copies on every rank (costing their full size per rank), and
the prefix runs on the copies: the frozen weights leave the per-step all-gathers, cache or not.

Batches padded to their own longest row (dynamic padding) would make a row's frozen output depend,
in its last bits, on the batch it came in (kernels block the padded length differently): with a
``canonical_length`` the prefix always runs at that length, cached or not, and its output is cut to
the batch's. The trainable blocks run at the batch's length.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Any, Callable, Optional

import torch
from torch import nn

from .cache import ActivationCache, crc32_of, row_keys
from .model_adapter import ModelAdapter


class FrozenPrefix:
    """Serves the frozen prefix's output to ``adapter.model``'s forward (module doc)."""

    def __init__(self, adapter: ModelAdapter, zero3: bool, replicate_frozen_weights: bool,
                 gathered: Callable[[list[nn.Parameter]], Any]):
        self.adapter, self.zero3 = adapter, zero3
        self.replicate = zero3 and replicate_frozen_weights
        self._gathered = gathered  # context manager making ZeRO-3 partitioned weights whole
        self.cache: Optional[ActivationCache] = None
        self.canonical_length: Optional[int] = None  # see the module doc; set with dynamic padding
        self.pad_id = 0  # input_ids of the positions added to reach it
        self._copies: dict[int, nn.Module] = {}  # id(original frozen module) -> its plain replicated copy
        self._contexts: list[Optional[contextlib.ExitStack]] = []  # per forward in flight (forwards nest)
        self.computing = False  # while the prefix runs inside: the model's forward must not be served again
        model = adapter.model
        self._handles = [model.register_forward_pre_hook(self._before, with_kwargs=True),
                         model.register_forward_hook(self._after, always_call=True)]

    # ------------------------------------------------------------------ boundary moves
    def set_boundary(self, num_frozen: int) -> None:
        """The prefix grew to ``num_frozen`` blocks (already frozen): copy the newly frozen modules
        under replication, and move the cache to a store named after the frozen weights."""
        if self.replicate:
            new = [m for m in self.adapter.frozen_modules(num_frozen) if id(m) not in self._copies]
            self._copies.update(zip(map(id, new), _plain_copies(new, self._gathered)))
        if self.cache is not None and num_frozen:
            self.cache.set_boundary(num_frozen, self.fingerprint(num_frozen))

    def weights_loaded(self) -> None:
        """The frozen weights were loaded from a checkpoint: the replicated copies are taken again."""
        if self.replicate and self._copies:
            modules = self.adapter.frozen_modules(self.adapter.num_frozen)
            self._copies = dict(zip(map(id, modules), _plain_copies(modules, self._gathered)))

    def fingerprint(self, num_frozen: int) -> str:
        """CRC of the frozen weights: a cache store is only valid for the weights that made it."""
        params = [p for m in self.adapter.frozen_modules(num_frozen) for p in m.parameters()]
        if self.zero3 and not self.replicate:
            with self._gathered(params):
                return crc32_of(params)
        if self.replicate:
            params = [p for m in self.adapter.frozen_modules(num_frozen) for p in self._copies[id(m)].parameters()]
        return crc32_of(params)

    def attach_cache(self, cache: ActivationCache) -> None:
        self.cache = cache
        if self.adapter.num_frozen:
            cache.set_boundary(self.adapter.num_frozen, self.fingerprint(self.adapter.num_frozen))

    # ------------------------------------------------------------------ the forward
    def _before(self, _module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        # _after always runs, even when this hook or an earlier one raises: it must find an entry.
        self._contexts.append(None)
        ids = kwargs.pop("example_ids", None)
        k = self.adapter.num_frozen
        use_cache = self.cache is not None and ids is not None and self.adapter.model.training
        # Without input_ids the prefix has already run (generate hands the decoder precomputed
        # encoder_outputs) or the caller feeds embeddings: the model's own forward serves it.
        if (k and not args and not self.computing and "input_ids" in kwargs
                and (use_cache or self.replicate or self.canonical_length)):
            inputs = {name: v for name, v in kwargs.items() if name != "labels"}
            hidden = self._from_cache([int(i) for i in ids], inputs) if use_cache else self.compute(k, inputs)
            stack = contextlib.ExitStack()
            stack.enter_context(self.adapter.run_from(k, hidden))
            self._contexts[-1] = stack
        return args, kwargs

    def _after(self, _module: nn.Module, _args: tuple, _output: Any) -> None:
        stack = self._contexts.pop() if self._contexts else None  # None: an earlier pre-hook raised
        if stack is not None:
            stack.close()

    def compute(self, block: int, inputs: dict[str, Any], start: Optional[tuple[int, torch.Tensor]] = None) -> torch.Tensor:
        """Hidden states entering ``block`` (from the embeddings, or from ``start`` = (k, states
        entering k) at the computing length), on the replicated copies when there are any, at the
        canonical length if one is set, cut to the inputs' length."""
        length = inputs["input_ids"].shape[-1]
        if self.canonical_length and length < self.canonical_length:
            inputs = _pad_inputs(inputs, self.canonical_length, self.pad_id)
        self.computing = True
        try:
            with self._swapped():
                hidden = self.adapter.hidden_before(block, inputs, start=start)
        finally:
            self.computing = False
        return hidden[:, :length].contiguous()  # as the cache serves it: kernels may round strided inputs differently

    @contextlib.contextmanager
    def _swapped(self):
        """Within the context the model's frozen modules are their replicated copies (if any)."""
        if not self._copies:
            yield
            return
        with self.adapter.substituted({id(m): c for m in self.adapter.frozen_modules(self.adapter.num_frozen)
                                       for c in [self._copies[id(m)]]}):
            yield

    def _from_cache(self, ids: list[int], inputs: dict[str, Any]) -> torch.Tensor:
        """The cache path: hidden states entering the first trainable block, (rows, T, H). Misses
        are computed (from the previous boundary's entry when there is one) and stored.

        An example may enter the blocks as several rows (multiple choice: one per choice, inputs
        (B, C, T)), each its own cache entry (``cache.row_keys``). Where the head never reads
        padding positions, entries are stored without them and come back zero-padded: padding
        rows reach the loss only as keys the attention mask weights by an exact zero."""
        k, cache = self.adapter.num_frozen, self.cache
        per = int(torch.Size(inputs["input_ids"].shape[1:-1]).numel())
        seq_len, device = inputs["input_ids"].shape[-1], inputs["input_ids"].device
        computing_len = max(seq_len, self.canonical_length or 0)
        entries = cache.get(row_keys(ids, per))
        missing = sorted({j // per for j, e in enumerate(entries) if e is None})  # examples
        if missing:
            mask = inputs.get("attention_mask")
            lengths = _unpadded_lengths(mask) if self.adapter.pad_rows_unread and mask is not None else None
            prev_k, prev = cache.get_previous(row_keys([ids[j] for j in missing], per))
            prev = {j: prev[n * per:(n + 1) * per] for n, j in enumerate(missing)}
            from_prev = [j for j in missing if all(e is not None for e in prev[j])]
            from_embeddings = [j for j in missing if j not in from_prev]
            batch = inputs["input_ids"].shape[0]
            for examples, start in ((from_prev, prev_k), (from_embeddings, None)):
                if not examples:
                    continue
                # Per-example inputs are sliced; anything else (a Trainer's num_items_in_batch) is passed on.
                sub = {name: v[examples] if torch.is_tensor(v) and v.dim() and v.shape[0] == batch else v
                       for name, v in inputs.items()}
                begin = None
                if start is not None:  # run only the newly frozen blocks, from the previous boundary's entries
                    begin = (start, _padded([e for j in examples for e in prev[j]], computing_len, device))
                computed = self.compute(k, sub, start=begin)
                rows = row_keys(examples, per)  # positions in this batch
                cache.put(row_keys([ids[j] for j in examples], per), computed,
                          [lengths[r] for r in rows] if lengths is not None else None, width=computing_len)
                for row, value in zip(rows, computed):
                    entries[row] = value
        return _padded(entries, seq_len, device)

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._copies.clear()


def _plain_copies(modules: list[nn.Module], gathered: Callable) -> list[nn.Module]:
    """Copies of ZeRO-3 modules holding their whole weights as plain tensors, without DeepSpeed's
    hooks or partitioning attributes (frozen: no gradients)."""
    params = [p for m in modules for p in m.parameters()]
    memo: dict[int, Any] = {}
    with gathered(params):
        # No clone: DeepSpeed gathers each weight into a tensor of its own and, on leaving, only
        # rebinds param.data to an empty one, so the gathered tensor is ours to keep, without a
        # second copy of the newly frozen weights at the freeze. A persistent (small, never
        # partitioned) weight is shared with its parameter: frozen, nothing writes to either in place.
        for p in params:
            memo[id(p)] = nn.Parameter(p.data, requires_grad=False)
    for m in modules:
        for sub in m.modules():
            # DeepSpeed's hooks are bound to its own objects: the copies get none.
            for name in ("_forward_pre_hooks", "_forward_hooks", "_backward_hooks", "_backward_pre_hooks",
                         "_forward_pre_hooks_with_kwargs", "_forward_hooks_with_kwargs",
                         "_forward_hooks_always_called", "_state_dict_hooks", "_load_state_dict_pre_hooks"):
                if hasattr(sub, name):
                    memo[id(getattr(sub, name))] = type(getattr(sub, name))()
    copies = [copy.deepcopy(m, memo) for m in modules]
    for c in copies:
        c.eval()
    return copies


def _unpadded_lengths(attention_mask: torch.Tensor) -> list[int]:
    """Per row entering the blocks, the positions up to its last unmasked one (right padding
    trimmed; a left-padded row keeps its full length)."""
    mask = attention_mask.reshape(-1, attention_mask.shape[-1]) != 0
    trailing = mask.flip(-1).int().cumsum(-1).eq(0).sum(-1)
    return (mask.shape[-1] - trailing).clamp(min=1).tolist()


def _padded(entries: list[torch.Tensor], seq_len: int, device: torch.device) -> torch.Tensor:
    """Stack (L, H) entries into (rows, seq_len, H): zeros past each L, cut at seq_len (an entry
    computed in a batch padded further is padding there); one copy per entry."""
    out = torch.zeros(len(entries), seq_len, *entries[0].shape[1:], dtype=entries[0].dtype, device=device)
    for row, e in enumerate(entries):
        n = min(e.shape[0], seq_len)
        out[row, :n] = e[:n]
    return out


def _pad_inputs(inputs: dict[str, Any], length: int, pad_id: int) -> dict[str, Any]:
    """The sequence inputs (those shaped like input_ids) right-padded to ``length``."""
    shape = inputs["input_ids"].shape
    extra = length - shape[-1]

    def pad(name: str, t: torch.Tensor) -> torch.Tensor:
        fill = pad_id if name == "input_ids" else 0
        return torch.cat([t, t.new_full((*t.shape[:-1], extra), fill)], dim=-1)

    return {name: pad(name, v) if torch.is_tensor(v) and v.shape == shape else v for name, v in inputs.items()}
