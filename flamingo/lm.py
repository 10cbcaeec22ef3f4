"""Wrapping a frozen Hugging Face causal LM: gated blocks before its decoder layers, trainable rows for the
added tokens, and a per-call slot through which the gated blocks receive the call's media.

Why a slot and not keyword arguments: not every HF architecture forwards extra arguments to its decoder
layers (MPT does not), and released checkpoints use remote code we do not control. The slot is set only for
the duration of one call by `Flamingo` (and per thread), so nothing is left on the model between calls.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .gated_cross_attention import GatedCrossAttentionBlock, MediaConditioning

# Where the decoder layers live, by architecture (the OpenFlamingo table plus GPT-2).
KNOWN_DECODER_LAYERS = {
    "llama": "model.layers",
    "mistral": "model.layers",
    "qwen2": "model.layers",
    "gemma": "model.layers",
    "opt": "model.decoder.layers",
    "gpt2": "transformer.h",
    "gptj": "transformer.h",
    "gpt_neox": "gpt_neox.layers",
    "mpt": "transformer.blocks",
    "mosaic_gpt": "transformer.blocks",
}


def infer_decoder_layers_attr_name(lm: nn.Module) -> str:
    model_type = getattr(getattr(lm, "config", None), "model_type", "")
    if model_type in KNOWN_DECODER_LAYERS:
        return KNOWN_DECODER_LAYERS[model_type]
    for path in dict.fromkeys(KNOWN_DECODER_LAYERS.values()):
        if isinstance(get_submodule(lm, path), nn.ModuleList):
            return path
    raise ValueError(f"cannot find the decoder layers of a {type(lm).__name__} (model_type {model_type!r}); "
                     "pass decoder_layers_attr_name, e.g. 'model.layers'")


def get_submodule(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


class ConditioningSlot:
    """Hands the media of the call in progress to every gated block; per thread, cleared after the call."""

    def __init__(self):
        self._local = threading.local()

    def current(self) -> MediaConditioning | None:
        return getattr(self._local, "value", None)

    @contextmanager
    def use(self, cond: MediaConditioning | None) -> Iterator[None]:
        previous = self.current()
        self._local.value = cond
        try:
            yield
        finally:
            self._local.value = previous

    def __reduce__(self):  # copies and pickles get a fresh, empty slot
        return (ConditioningSlot, ())


class FlamingoLayer(nn.Module):
    """A decoder layer preceded by its gated block (None on layers without one). Names match OpenFlamingo."""

    def __init__(self, gated_cross_attn_layer: GatedCrossAttentionBlock | None, decoder_layer: nn.Module,
                 slot: ConditioningSlot):
        super().__init__()
        self.gated_cross_attn_layer = gated_cross_attn_layer
        self.decoder_layer = decoder_layer
        self.slot = slot

    def forward(self, hidden_states, *args, **kwargs):
        if self.gated_cross_attn_layer is not None:
            hidden_states = self.gated_cross_attn_layer(hidden_states, self.slot.current())
        return self.decoder_layer(hidden_states, *args, **kwargs)

    def __getattr__(self, name):
        # The LM's own code may read attributes of its layers (e.g. `attention_type`): pass them through.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "decoder_layer":
                raise
            return getattr(self.decoder_layer, name)


class AddedRows(nn.Module):
    """A frozen LM matrix (embedding or output layer) whose rows for the tokens Flamingo adds are trained.

    The frozen matrix keeps the LM's own `weight` name (a tied output layer keeps sharing it); the added
    tokens' rows live in `added_rows`, so an optimiser over trainable parameters touches only them."""

    def __init__(self, weight: nn.Parameter, added_token_ids: list[int]):
        super().__init__()
        self.weight = weight
        self.register_buffer("added_token_ids", torch.tensor(added_token_ids, dtype=torch.long), persistent=False)
        self.added_rows = nn.Parameter(weight.detach()[added_token_ids].clone())

    def reset_added_rows(self) -> None:
        """Take the added rows from `weight` (after loading a checkpoint that trained the whole matrix)."""
        with torch.no_grad():
            self.added_rows.copy_(self.weight[self.added_token_ids])


class AddedTokenEmbedding(AddedRows):
    """The LM's input embedding, with trained rows for the added tokens."""

    def __init__(self, embedding: nn.Embedding, added_token_ids: list[int]):
        super().__init__(embedding.weight, added_token_ids)

    @property
    def num_embeddings(self) -> int:
        return self.weight.shape[0]

    @property
    def embedding_dim(self) -> int:
        return self.weight.shape[1]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = F.embedding(input_ids, self.weight)                            # (B, L, D)
        for row, token_id in enumerate(self.added_token_ids.tolist()):
            out = torch.where((input_ids == token_id)[..., None], self.added_rows[row].to(out.dtype), out)
        return out


class AddedTokenHead(AddedRows):
    """The LM's output layer, with trained rows for the added tokens: without them a frozen (random) row
    would decide when the model emits `<|endofchunk|>`, and it could hardly learn to stop."""

    def __init__(self, head: nn.Linear, added_token_ids: list[int]):
        super().__init__(head.weight, added_token_ids)
        self.bias = head.bias

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden, self.weight, self.bias)                    # (..., V)
        bias = None if self.bias is None else self.bias[self.added_token_ids]
        added = F.linear(hidden, self.added_rows.to(hidden.dtype), bias)     # (..., n_added)
        return logits.index_copy(-1, self.added_token_ids, added.to(logits.dtype))


def inject_flamingo_layers(lm: nn.Module, decoder_layers_attr_name: str, every_n: int, lang_dim: int,
                           vis_dim: int, heads: int, dim_head: int, ff_mult: int,
                           only_attend_immediate_media: bool, slot: ConditioningSlot) -> None:
    """Wrap every decoder layer; layers i with (i + 1) % every_n == 0 get a gated block (OpenFlamingo's rule)."""
    layers = lm.get_submodule(decoder_layers_attr_name)
    wrapped = nn.ModuleList(
        FlamingoLayer(
            GatedCrossAttentionBlock(lang_dim, vis_dim, dim_head, heads, ff_mult, only_attend_immediate_media)
            if (i + 1) % every_n == 0 else None,
            layer,
            slot,
        )
        for i, layer in enumerate(layers)
    )
    set_submodule(lm, decoder_layers_attr_name, wrapped)


def input_embedding_path(lm: nn.Module) -> str:
    """Dotted name of the LM's input embedding module (to map checkpoint keys)."""
    target = lm.get_input_embeddings()
    for name, module in lm.named_modules():
        if module is target:
            return name
    raise ValueError("the LM's input embedding is not one of its submodules")
