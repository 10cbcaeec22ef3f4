"""Wrapping a frozen Hugging Face causal LM: gated blocks before its decoder layers, trainable rows for the
added tokens, a per-call slot through which the gated blocks receive the call's media, and `ConditionedLM`,
the one way to call the wrapped LM (tokens + the call's media in, logits out).

Why a slot and not keyword arguments: not every HF architecture forwards extra arguments to its decoder
layers (MPT does not), and released checkpoints use remote code we do not control. `ConditionedLM` sets the
slot only for the duration of one call (and per thread), so nothing is left on the model between calls; a
gated block that finds the slot empty raises, since the LM was then called directly, without its media.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from . import prefix_attention
from .config import FlamingoConfig
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


def decoder_layers(lm: nn.Module, path: str) -> nn.ModuleList:
    """The LM's decoder layers, at `path` (a config's decoder_layers_attr_name)."""
    layers = lm.get_submodule(path)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{path} of a {type(lm).__name__} is a {type(layers).__name__}, not its list of decoder "
                         "layers; pass decoder_layers_attr_name, e.g. 'model.layers'")
    return layers


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

    added_token_ids: torch.Tensor   # buffer (n_added,) long

    def __init__(self, weight: torch.Tensor, added_token_ids: list[int]):
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
        for row in range(self.added_token_ids.shape[0]):   # ids stay tensors: no host sync in a compiled step
            hit = input_ids == self.added_token_ids[row]
            out = torch.where(hit[..., None], self.added_rows[row].to(out.dtype), out)
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
        return logits.index_copy_(-1, self.added_token_ids, added.to(logits.dtype))   # in place: no copy of (..., V)


def lm_width(lm: PreTrainedModel) -> int:
    """Width of the LM's hidden states, which its gated blocks take."""
    return getattr(lm.config, "d_model", None) or lm.config.hidden_size          # MPT: d_model


def new_gated_block(config: FlamingoConfig, lang_dim: int, vis_dim: int) -> GatedCrossAttentionBlock:
    """One gated block as the config sizes it (also made on the meta device to size a model before building)."""
    return GatedCrossAttentionBlock(lang_dim, vis_dim, config.xattn_dim_head, config.xattn_heads, config.ff_mult,
                                    config.only_attend_immediate_media, config.gate_init)


def inject_flamingo_layers(lm: PreTrainedModel, config: FlamingoConfig, slot: ConditioningSlot) -> None:
    """Wrap every decoder layer; layers i with (i + 1) % every_n == 0 get a gated block (OpenFlamingo's rule)."""
    path, vis_dim = config.decoder_layers_attr_name, config.vis_dim
    if path is None or vis_dim is None:
        raise ValueError("the config leaves decoder_layers_attr_name or vis_dim open; complete it from the "
                         "backbones first (flamingo.model.complete_config)")
    lang_dim = lm_width(lm)
    layers = decoder_layers(lm, path)
    wrapped = nn.ModuleList(
        FlamingoLayer(
            new_gated_block(config, lang_dim, vis_dim) if (i + 1) % config.cross_attn_every_n_layers == 0
            else None,
            layer,
            slot,
        )
        for i, layer in enumerate(layers)
    )
    set_submodule(lm, path, wrapped)


def input_embedding_weight(lm: PreTrainedModel) -> torch.Tensor:
    """The LM's input embedding matrix (V, D), in the LM's dtype."""
    weight = lm.get_input_embeddings().weight
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"the LM's input embedding has no weight matrix (got {type(weight).__name__})")
    return weight


def input_embedding_path(lm: PreTrainedModel) -> str:
    """Dotted name of the LM's input embedding module (to map checkpoint keys)."""
    target = lm.get_input_embeddings()
    for name, module in lm.named_modules():
        if module is target:
            return name
    raise ValueError("the LM's input embedding is not one of its submodules")


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip padding, so a padded row computes exactly what it would alone."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class ConditionedLM:
    """The wrapped LM as Flamingo calls it: one call = token ids + the call's media (a `MediaConditioning`).

    It owns the call path: which media each token sees (`conditioning`), the slot the gated blocks read them
    from, and which arguments this LM accepts. Decoding (generation.py) drives only this object. It holds no
    weights of its own: `lang_encoder` is the module registered on the Flamingo model."""

    def __init__(self, lang_encoder: PreTrainedModel, slot: ConditioningSlot, media_token_id: int,
                 media_token: str = "<image>"):
        self.lang_encoder = lang_encoder
        self.slot = slot
        self.media_token_id = media_token_id
        self.media_token = media_token
        self.arguments = set(inspect.signature(lang_encoder.forward).parameters)
        self.shares_prefix_attention = prefix_attention.installed(lang_encoder)
        # The decode step compiled by decode_step.compile_decode_step; None: decode eagerly.
        self.compiled_step: Callable | None = None

    @classmethod
    def wrap(cls, lang_encoder: PreTrainedModel, config: FlamingoConfig, media_token_id: int) -> ConditionedLM:
        """Turn a plain HF causal LM into Flamingo's (in place): gated blocks before its decoder layers,
        trainable rows for the added tokens, shared-prefix attention where the architecture takes it."""
        added = config.added_token_ids
        if added is None:
            raise ValueError("the config leaves added_token_ids open; complete it from the tokenizer first "
                             "(flamingo.model.complete_config)")
        embedding = lang_encoder.get_input_embeddings()
        if not isinstance(embedding, nn.Embedding):
            raise ValueError(f"the LM's input embedding is a {type(embedding).__name__}, not an nn.Embedding")
        slot = ConditioningSlot()
        inject_flamingo_layers(lang_encoder, config, slot)
        lang_encoder.set_input_embeddings(AddedTokenEmbedding(embedding, added))
        head = lang_encoder.get_output_embeddings()
        if isinstance(head, nn.Linear):
            lang_encoder.set_output_embeddings(AddedTokenHead(head, added))
        prefix_attention.install(lang_encoder)
        return cls(lang_encoder, slot, media_token_id, config.media_token)

    @property
    def config(self) -> PreTrainedConfig:
        """The HF config of the LM (cache shapes)."""
        return self.lang_encoder.config

    def gated_cross_attn_layers(self) -> list[GatedCrossAttentionBlock]:
        return [m for m in self.lang_encoder.modules() if isinstance(m, GatedCrossAttentionBlock)]

    @property
    def only_attend_immediate_media(self) -> bool:
        """Whether a text token sees only the last media before it (OpenFlamingo's rule), not every earlier one."""
        return all(block.attn.only_attend_immediate_media for block in self.gated_cross_attn_layers())

    def conditioning(self, input_ids: torch.Tensor, visual_tokens: torch.Tensor | None,
                     media_offset: int = 0) -> MediaConditioning:
        """Which media each text token sees: the k-th `<image>` of a row is media k (+ media_offset).
        input_ids: (B, L); visual_tokens: (B, T, n, D_vis) or None for text only."""
        media_index = (input_ids == self.media_token_id).long().cumsum(-1) - 1 + media_offset   # (B, L)
        available = 0 if visual_tokens is None else visual_tokens.shape[1]
        needed = int(media_index.max()) + 1 if media_index.numel() else 0
        if needed > available:
            raise ValueError(f"the text has {needed - media_offset} {self.media_token} token(s) in a row "
                             f"but only {available - media_offset} media were given")
        if visual_tokens is not None:
            visual_tokens = visual_tokens.to(input_embedding_weight(self.lang_encoder).dtype)
        return MediaConditioning(visual_tokens, media_index)

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                 cond: MediaConditioning, past_key_values=None, labels: torch.Tensor | None = None,
                 logits_to_keep: int = 0, use_cache: bool = True, prefix_kv: list | None = None
                 ) -> CausalLMOutputWithPast:
        """One LM call with the gated blocks seeing `cond` for exactly its duration. `prefix_kv`: keys/values
        of a shared prefix the tokens continue (see prefix_attention)."""
        cache_argument = "cache" if "cache" in self.arguments else "past_key_values"   # transformers >= 5.2x: cache
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, cache_argument: past_key_values,
                  "use_cache": use_cache, "labels": labels}
        if prefix_kv is not None:
            kwargs[prefix_attention.PREFIX_ARGUMENT] = prefix_kv
        if "position_ids" in self.arguments:  # ALiBi models (MPT) take none: their bias is relative
            kwargs["position_ids"] = position_ids
        if logits_to_keep and "logits_to_keep" in self.arguments:
            kwargs["logits_to_keep"] = logits_to_keep
        with self.slot.use(cond):
            return self.lang_encoder(**kwargs)
