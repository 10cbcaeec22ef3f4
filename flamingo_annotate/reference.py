"""OpenFlamingo 2.0.1's own `Flamingo`, built around the same backbones and weights as ours: the numerical
reference that the benchmark (`bench --compare-openflamingo`) and the parity tests compare against.

Needs OpenFlamingo next to the current stack: `pip install --no-deps open-flamingo==2.0.1 einops einops-exts`
(its own pins, torch 2.0 and transformers 4.33, are not needed: its code runs unchanged). Its code is used
as it is, with one shim: transformers 5's `generate()` calls the language model without `attention_mask`,
which OpenFlamingo's LM mixin requires positionally, so the mixin installed here gives it a default.
"""

from __future__ import annotations

import copy
import re
from types import SimpleNamespace
from typing import Any, cast

import torch
from open_flamingo.src.flamingo import Flamingo as OpenFlamingo
from open_flamingo.src.flamingo_lm import FlamingoLMMixin
from open_flamingo.src.utils import extend_instance
from transformers import PreTrainedModel

from flamingo import Flamingo
from flamingo.backbones import build_lang_encoder
from flamingo.checkpoint import openflamingo_key_map
from flamingo.lm import input_embedding_weight


class LMMixin(FlamingoLMMixin):
    """OpenFlamingo's LM mixin, callable without `attention_mask` (as transformers 5's generate() calls it)."""

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        return FlamingoLMMixin.forward(self, input_ids, attention_mask, **kwargs)


def build_reference(clip: Any, lang_encoder: PreTrainedModel, *, eoc_token_id: int, media_token_id: int,
                    vis_dim: int, cross_attn_every_n_layers: int, decoder_layers_attr_name: str) -> OpenFlamingo:
    """OpenFlamingo's model around an open_clip model `clip` (the tower is `clip.visual`) and a Hugging Face
    causal LM, as OpenFlamingo's own factory assembles them. The LM's embeddings must already have rows for
    the added tokens. The bridges are OpenFlamingo's initial ones: gates at 0."""
    clip.visual.output_tokens = True
    extend_instance(lang_encoder, LMMixin)
    cast(LMMixin, lang_encoder).set_decoder_layers_attr_name(decoder_layers_attr_name)  # now an LMMixin too
    return OpenFlamingo(clip, lang_encoder, eoc_token_id, media_token_id, vis_dim=vis_dim,
                        cross_attn_every_n_layers=cross_attn_every_n_layers)


def reference_copy(model: Flamingo) -> OpenFlamingo:
    """OpenFlamingo's model holding the same weights as `model`, on its device and in its dtype, for
    inference. Raises ValueError for a model whose bridges OpenFlamingo cannot represent."""
    c = model.config
    assert c.vis_dim is not None and c.decoder_layers_attr_name is not None  # a built model's config is complete
    own_lm: PreTrainedModel = model.lang_encoder
    lm = build_lang_encoder(c.lang_encoder, own_lm.config.to_dict() if c.lang_encoder_config is None
                            else c.lang_encoder_config)
    lm.resize_token_embeddings(input_embedding_weight(own_lm).shape[0])
    clip = SimpleNamespace(visual=copy.deepcopy(model.vision_encoder))   # all OpenFlamingo reads of it
    reference = build_reference(clip, lm, eoc_token_id=model.eoc_token_id, media_token_id=model.media_token_id,
                                vis_dim=c.vis_dim, cross_attn_every_n_layers=c.cross_attn_every_n_layers,
                                decoder_layers_attr_name=c.decoder_layers_attr_name)
    _copy_weights(model, reference)
    return reference.to(model.device, model.dtype).eval().requires_grad_(False)


def _copy_weights(model: Flamingo, reference: OpenFlamingo) -> None:
    """Our weights into OpenFlamingo's module tree, every key accounted for. OpenFlamingo hard-codes its
    bridges' sizes, so models built with other sizes cannot be compared."""
    ours = model.state_dict()
    renames = openflamingo_key_map(model)
    problems = []
    with torch.no_grad():
        for name, p in reference.state_dict(keep_vars=True).items():
            mapped = name
            for pattern, target in renames.items():
                mapped = re.sub(pattern, target, mapped)
            if mapped not in ours or ours[mapped].shape != p.shape:
                problems.append(name)
            else:
                p.copy_(ours[mapped])
    frames = model.perceiver.frame_embs
    if problems or (frames is not None and bool(frames.any())):
        raise ValueError("this model's bridges differ from OpenFlamingo's fixed sizes (resampler depth 6, 8 heads "
                         "of 64, 64 latents, no time embeddings); use a preset with OpenFlamingo's bridges. "
                         f"Unmatched: {', '.join(problems[:5])}")
