"""Splits a Hugging Face model into embeddings, an ordered list of blocks, and the rest.

The freezing unit is a block; block 0 takes the embeddings with it (and any module block 0 shares
with the later blocks, such as MPNet's relative position bias table). Everything else (pooler,
final norm, task head) is never frozen, but for a head whose weight is the embedding matrix (a
tied LM head, below). Layouts are written relative to the base model
(``model.base_model``), so every task head of a family (sequence classification, question
answering, multiple choice, conditional generation, causal LM) shares one.

Encoder-decoder models (BART, T5): the blocks are the encoder's, in order; the decoder is never
frozen. The decoder cross-attends to the encoder's final output in every block, so no decoder
block has a fixed input while any encoder block trains, and it produces the output the task is
scored on; the encoder is the front of the data flow the freezing rule is about. Freezing block 0
also freezes the shared token embedding, which the decoder (and a tied LM head) use too, as Hugging
Face's ``--freeze_embeds`` does: the frozen prefix's output must be a pure function of the input.
Decoder-only causal LMs (GPT-2, Llama, Mistral, Qwen2) are blocks after the embeddings like an
encoder; a tied LM head (GPT-2's, or any with ``tie_word_embeddings``) is the embedding matrix and
freezes with block 0 the same way, while the final norm keeps training.

Running "from block k" reuses the model's own forward, so masks, position handling and the
head stay exactly Hugging Face's: the block list is swapped for its suffix ``blocks[k:]`` for
the duration of the call (for Qwen2, whose forward picks each layer's mask by list position, for
a list of the same length with pass-through stand-ins before block k) and the hidden states
entering block k are substituted by a pre-hook. The embedding modules are swapped for
placeholders too: they would only compute an output that is discarded (and, under ZeRO-3,
all-gather their weights every step to do so). Shared modules keep running: the trainable blocks
still read what they compute.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import nn


@dataclass(frozen=True)
class _Layout:
    embeddings: tuple[str, ...]  # module paths frozen with block 0 and skipped when running from a block
    blocks: str  # path of the nn.ModuleList of blocks, in execution order
    # Dropout applied to the embeddings outside the embedding modules: turned off when block 0
    # freezes (an nn.Module is put in eval mode, a float attribute set to 0.0) so the frozen
    # prefix is deterministic.
    embedding_dropout: tuple[str, ...] = ()
    # T5: block 0's self-attention computes the relative position bias the later blocks reuse;
    # a run starting past block 0 must be handed it.
    position_bias: Optional[str] = None
    # Modules block 0 reads that the later blocks read too (MPNet's encoder computes one relative
    # position bias from its table and hands it to every layer). They freeze with block 0, as
    # block 0's output (what the cache stores) would go stale if they trained, but unlike the
    # embeddings they are not skipped when running from a block: the trainable blocks need them.
    shared_frozen: tuple[str, ...] = ()
    # The model's forward reads per-block settings by position in the block list (Qwen2 picks each
    # layer's mask, full or sliding window, as ``config.layer_types[i]``): running from block k keeps
    # the list whole, with pass-through stand-ins for the skipped blocks, instead of cutting it.
    keep_positions: bool = False


# model_type -> where its parts live, relative to model.base_model.
_LAYOUTS: dict[str, _Layout] = {
    "bert": _Layout(("embeddings",), "encoder.layer"),
    "roberta": _Layout(("embeddings",), "encoder.layer"),
    "xlm-roberta": _Layout(("embeddings",), "encoder.layer"),
    "electra": _Layout(("embeddings", "embeddings_project"), "encoder.layer"),
    "distilbert": _Layout(("embeddings",), "transformer.layer"),
    "gpt2": _Layout(("wte", "wpe"), "h", embedding_dropout=("drop",)),
    "llama": _Layout(("embed_tokens",), "layers"),
    "mistral": _Layout(("embed_tokens",), "layers"),
    "qwen2": _Layout(("embed_tokens",), "layers", keep_positions=True),
    # BartEncoder applies its embedding dropout functionally, with the float ``encoder.dropout``.
    "bart": _Layout(("encoder.embed_tokens", "encoder.embed_positions", "encoder.layernorm_embedding"),
                    "encoder.layers", embedding_dropout=("encoder.dropout",)),
    # T5Stack's one dropout module also follows the encoder's final norm: turning it off for the
    # frozen embeddings turns that one off too (documented in docs/tasks.md).
    "t5": _Layout(("encoder.embed_tokens",), "encoder.block", embedding_dropout=("encoder.dropout",),
                  position_bias="layer.0.SelfAttention"),
    "mt5": _Layout(("encoder.embed_tokens",), "encoder.block", embedding_dropout=("encoder.dropout",),
                   position_bias="layer.0.SelfAttention"),
    "mpnet": _Layout(("embeddings",), "encoder.layer", shared_frozen=("encoder.relative_attention_bias",)),
}
# MiniLM checkpoints (e.g. all-MiniLM-L6-v2) are model_type "bert".
SUPPORTED_MODEL_TYPES = tuple(sorted(_LAYOUTS))


_PAD_BLIND_HEADS = ("ForSequenceClassification", "ForMultipleChoice", "ForConditionalGeneration")


class UnsupportedModelError(ValueError):
    pass


def _get(root: nn.Module, path: str) -> Optional[nn.Module]:
    """The submodule (or attribute) at dotted ``path`` under root; root itself for ""."""
    if not path:
        return root
    module = root
    for name in path.split("."):
        module = getattr(module, name, None)
        if module is None:
            return None
    return module


class ModelAdapter:
    """Block view of a Hugging Face model (any task head of a supported family).

    ``set_frozen(k)`` freezes embeddings + shared modules + blocks[:k] (requires_grad off, eval
    mode: no dropout, so a frozen block's output is a pure function of its input and can be cached).
    """

    def __init__(self, model: nn.Module):
        # A PEFT model (LoRA) wraps the Hugging Face model and injects its adapters into that
        # model's own modules: the blocks are the wrapped model's, adapters included, so a frozen
        # block's adapters freeze with it. Forwards still go through the wrapper.
        hf = model.get_base_model() if hasattr(model, "get_base_model") else model
        model_type = getattr(getattr(hf, "config", None), "model_type", None)
        layout = _LAYOUTS.get(model_type)
        if layout is None:
            raise UnsupportedModelError(
                f"model type {model_type!r} ({type(hf).__name__}) is not supported; "
                f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}")
        self.base = getattr(hf, "base_model", hf)
        blocks = _get(self.base, layout.blocks)
        if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
            raise UnsupportedModelError(
                f"{type(model).__name__}: expected a block list at '{layout.blocks}' of its base model "
                f"({type(self.base).__name__}); supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}")
        self.model = model
        self._layout = layout
        self.blocks: list[nn.Module] = list(blocks)
        self.embeddings: list[nn.Module] = [m for m in (_get(self.base, p) for p in layout.embeddings) if m is not None]
        self.shared_frozen: list[nn.Module] = [m for m in (_get(self.base, p) for p in layout.shared_frozen)
                                               if m is not None]
        self.num_frozen = 0
        self._eval_hooks: dict[int, torch.utils.hooks.RemovableHandle] = {}
        # Heads that read only unpadded positions (a pooled / last-token classifier per sequence or
        # choice; a decoder cross-attending with the encoder's mask): the hidden states of padding
        # positions reach the loss only as masked keys, weighted by an exact zero, so the cache may
        # drop them. Token-level heads (QA span logits over every position; a causal LM's logits,
        # scored wherever the labels are not -100) and anything unknown keep them.
        self.pad_rows_unread = type(hf).__name__.endswith(_PAD_BLIND_HEADS)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def block_parameters(self, index: int) -> list[nn.Parameter]:
        return list(self.blocks[index].parameters())

    def frozen_modules(self, num_frozen: int) -> list[nn.Module]:
        return (self.embeddings + self.shared_frozen + self.blocks[:num_frozen]) if num_frozen > 0 else []

    def set_frozen(self, num_frozen: int) -> None:
        """Freeze embeddings, shared modules and blocks[:num_frozen]. The boundary only moves forward."""
        if not 0 <= num_frozen < self.num_blocks + 1:
            raise ValueError(f"num_frozen={num_frozen} outside [0, {self.num_blocks}]")
        if num_frozen < self.num_frozen:
            raise ValueError(f"freezing is a prefix that only grows: {self.num_frozen} -> {num_frozen}")
        modules = list(self.frozen_modules(num_frozen))
        # A parameter the prefix shares with modules after it freezes with the prefix: a tied LM
        # head (GPT-2; Llama-family configs with tie_word_embeddings) is the input embedding
        # matrix, and BART's / T5's decoder reads the encoder's token embedding. Were it to train,
        # the prefix's output would move and its cached copies go stale (docs/tasks.md).
        for module in modules:
            for p in module.parameters():
                p.requires_grad_(False)
                p.grad = None
        if num_frozen > 0:
            for path in self._layout.embedding_dropout:
                owner_path, _, name = path.rpartition(".")
                owner = _get(self.base, owner_path)
                if isinstance(getattr(owner, name), nn.Module):
                    modules.append(getattr(owner, name))
                else:
                    setattr(owner, name, 0.0)
        for module in modules:
            module.eval()
            if id(module) not in self._eval_hooks:
                # Whoever calls model.train() later (an engine, a Trainer), a frozen module runs in
                # eval mode: its output must stay a pure function of its input.
                self._eval_hooks[id(module)] = module.register_forward_pre_hook(_keep_eval)
        self.num_frozen = num_frozen

    @contextlib.contextmanager
    def substituted(self, replacements: dict[int, nn.Module]) -> Iterator[None]:
        """Within the context, each embedding, shared module or block whose id is a key of
        ``replacements`` is replaced in the model by the module it maps to."""
        swaps = []
        for path in (*self._layout.embeddings, *self._layout.shared_frozen):
            owner_path, _, name = path.rpartition(".")
            owner = _get(self.base, owner_path)
            module = getattr(owner, name, None)
            if module is not None and id(module) in replacements:
                swaps.append((owner, name, module, replacements[id(module)]))
        blocks = _get(self.base, self._layout.blocks)
        swapped = {i: b for i, b in enumerate(blocks) if id(b) in replacements}
        for owner, name, _, replacement in swaps:
            setattr(owner, name, replacement)
        for i, original in swapped.items():
            blocks[i] = replacements[id(original)]
        try:
            yield
        finally:
            for owner, name, original, _ in swaps:
                setattr(owner, name, original)
            for i, original in swapped.items():
                blocks[i] = original

    @contextlib.contextmanager
    def run_from(self, start_block: int, hidden_states: torch.Tensor) -> Iterator[None]:
        """Within the context, a forward of the model feeds ``hidden_states`` (the output of
        block ``start_block - 1``, shape (B, T, H)) into block ``start_block`` and skips the
        blocks before it. Other inputs (attention mask, labels) are passed to the model as usual."""
        if not 0 < start_block < self.num_blocks:
            raise ValueError(f"start_block={start_block} outside [1, {self.num_blocks - 1}]")
        parent_path, _, attr = self._layout.blocks.rpartition(".")
        parent = _get(self.base, parent_path)
        full = getattr(parent, attr)
        bias_owner = _get(self.blocks[0], self._layout.position_bias) if self._layout.position_bias else None

        def substitute(_module, args, kwargs):
            if bias_owner is not None and len(args) > 2 and args[2] is None:
                # What block 0 would have passed on (T5Block's third positional argument).
                length = hidden_states.shape[1]
                args = (*args[:2], bias_owner.compute_bias(length, length, device=hidden_states.device), *args[3:])
            if args:
                return (hidden_states, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden_states}

        handle = self.blocks[start_block].register_forward_pre_hook(substitute, with_kwargs=True)
        # Assigning a new ModuleList through nn.Module.__setattr__ re-registers the same block
        # objects; no parameter is copied and the originals are put back below.
        skipped = [_PassThrough() for _ in range(start_block)] if self._layout.keep_positions else []
        swaps = [(parent, attr, full, nn.ModuleList([*skipped, *self.blocks[start_block:]]))]
        for path in self._layout.embeddings:
            owner_path, _, name = path.rpartition(".")
            owner = _get(self.base, owner_path)
            if getattr(owner, name, None) is not None:
                swaps.append((owner, name, getattr(owner, name), _Placeholder(hidden_states)))
        for owner, name, _, replacement in swaps:
            setattr(owner, name, replacement)
        try:
            yield
        finally:
            for owner, name, original, _ in swaps:
                setattr(owner, name, original)
            handle.remove()

    @torch.no_grad()
    def hidden_before(self, block: int, inputs: dict, start: Optional[tuple[int, torch.Tensor]] = None) -> torch.Tensor:
        """Hidden states (B, T, H) entering ``block``: the frozen prefix's output. Runs the model
        up to ``block`` only (from the embeddings, or from ``start=(k, states entering k)``)."""
        captured: list = []
        context = self.run_from(*start) if start is not None else contextlib.nullcontext()
        try:
            with context, self.capture_input(block, captured, stop=True):
                self.model(**inputs)
        except _StopForward:
            pass
        return captured[0]

    @contextlib.contextmanager
    def capture_input(self, block: int, store: list, stop: bool = False) -> Iterator[None]:
        """Within the context, append the hidden states entering ``block`` (detached) to store;
        with ``stop``, end the forward there by raising _StopForward (hidden_before catches it)."""

        def grab(_module, args, kwargs):
            store.append((args[0] if args else kwargs["hidden_states"]).detach())
            if stop:
                raise _StopForward

        # First among the block's pre-hooks: under ZeRO-3 the block's own weights are then never
        # gathered just to stop here.
        handle = self.blocks[block].register_forward_pre_hook(grab, with_kwargs=True, prepend=True)
        try:
            yield
        finally:
            handle.remove()


class _Placeholder(nn.Module):
    """Stands in for an embedding module whose output is replaced anyway: zeros shaped like the
    hidden states (so sums and dtype-derived masks downstream behave), no weights touched."""

    def __init__(self, like: torch.Tensor):
        super().__init__()
        self.like = like

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return torch.zeros_like(self.like)


class _PassThrough(nn.Module):
    """Stands in for a skipped block where the block list must keep its length: returns the hidden
    states it is given (the embedding placeholder's zeros, replaced at the first real block)."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states


def _keep_eval(module: nn.Module, _args: tuple) -> None:
    if module.training:
        module.eval()


class _StopForward(Exception):
    """Ends a forward pass once the wanted hidden states are captured; the rest is not needed."""
