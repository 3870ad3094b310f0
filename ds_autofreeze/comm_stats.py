"""Bytes handed to collectives: the proof that gradient traffic shrinks with the trainable set.

Every collective DeepSpeed issues (ZeRO's bucketed all-reduce, reduce, reduce-scatter, the
parameter all-gather after the step, our own decision all-reduce) goes through one object,
``deepspeed.comm.comm.cdb``; ``CollectiveCounter`` wraps its methods while active and records
the payload of each call. The payload is the tensor the caller hands over (for gathers: the
gathered output), not the wire bytes of a particular algorithm (a ring all-reduce moves
2(n-1)/n of it per rank), so it compares directly with "trainable gradient bytes".
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Callable

import torch

# cdb method -> how to find the payload tensors among its arguments.
_PAYLOAD: dict[str, Callable[..., list[torch.Tensor]]] = {
    "all_reduce": lambda tensor, *a, **k: [tensor],
    "inference_all_reduce": lambda tensor, *a, **k: [tensor],
    "all_reduce_coalesced": lambda tensors, *a, **k: list(tensors),
    "reduce": lambda tensor, *a, **k: [tensor],
    "broadcast": lambda tensor, *a, **k: [tensor],
    "reduce_scatter": lambda output, input_list, *a, **k: list(input_list),
    "reduce_scatter_tensor": lambda output_tensor, input_tensor, *a, **k: [input_tensor],
    "all_gather": lambda tensor_list, tensor, *a, **k: list(tensor_list),
    "all_gather_into_tensor": lambda output_tensor, input_tensor, *a, **k: [output_tensor],
    "all_gather_base": lambda output_tensor, input_tensor, *a, **k: [output_tensor],
    "all_gather_coalesced": lambda output_tensors, input_tensors, *a, **k: list(output_tensors),
    "all_to_all_single": lambda output, input, *a, **k: [input],
}


class CollectiveCounter:
    """Context manager counting collective calls and payload bytes per operation.

    >>> with CollectiveCounter() as comm:
    ...     engine.backward(loss); engine.step()
    >>> comm.bytes["reduce"], comm.total_bytes
    """

    def __init__(self) -> None:
        self.bytes: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()
        self._saved: dict[str, Any] = {}

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())

    def reset(self) -> None:
        self.bytes.clear()
        self.calls.clear()

    def __enter__(self) -> "CollectiveCounter":
        from deepspeed.comm import comm
        if comm.cdb is None:
            raise RuntimeError("CollectiveCounter needs an initialized deepspeed.comm backend")
        self._backend = comm.cdb
        for name, payload in _PAYLOAD.items():
            original = getattr(self._backend, name, None)
            if original is not None:
                self._saved[name] = original
                setattr(self._backend, name, self._counting(name, original, payload))
        return self

    def _counting(self, name: str, original: Callable, payload: Callable) -> Callable:
        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            self.bytes[name] += sum(t.numel() * t.element_size() for t in payload(*args, **kwargs))
            return original(*args, **kwargs)
        return counted

    def __exit__(self, *exc: Any) -> None:
        for name in self._saved:
            delattr(self._backend, name)  # the instance attribute shadowed the class method
        self._saved.clear()
