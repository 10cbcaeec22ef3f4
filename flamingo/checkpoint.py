"""Weights in and out: the project's own format (safetensors + JSON, never a pickle) and released
OpenFlamingo checkpoints, mapped key by key.

An OpenFlamingo `checkpoint.pt` is a flat state dict of (at least) its trainable parameters. Besides our own
names (which follow OpenFlamingo's), it may hold two aliases that OpenFlamingo's module tree creates:
`lang_encoder.gated_cross_attn_layers.<i>.*` (the same blocks as `<layers>.<i>.gated_cross_attn_layer.*`)
and `lang_encoder.old_decoder_blocks.<i>.*` (the same layers as `<layers>.<i>.decoder_layer.*`). Frozen
backbone weights, when present, are loaded too (they are what the checkpoint says). Required: every
resampler and gated-block parameter, except `perceiver.frame_embs` (OpenFlamingo has no time embeddings;
they stay zero, which leaves images exactly as OpenFlamingo computes them).

These functions take a model and need nothing but its modules and config, so `Flamingo.save_pretrained` and
`Flamingo.load_openflamingo_checkpoint` call them. Loading a saved folder builds a model first: that is
`flamingo.builder.load_pretrained`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import safetensors.torch
import torch

from .lm import AddedRows, input_embedding_path

if TYPE_CHECKING:
    from .model import Flamingo

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_DIR = "tokenizer"
OPTIONAL_KEYS = {"perceiver.frame_embs"}


def save_pretrained(model: Flamingo, path: str | Path) -> None:
    """Everything needed to rebuild the model offline: config (with the backbones' own configs), all
    weights, and the tokenizer."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    lm_config = model.lang_encoder.config.to_dict()
    config = dataclasses.replace(model.config, lang_encoder_config=lm_config, tokenizer=TOKENIZER_DIR,
                                 vision_encoder_pretrained=None)
    config.save(path / CONFIG_FILE)
    model.tokenizer.save_pretrained(path / TOKENIZER_DIR)
    safetensors.torch.save_model(model, str(path / WEIGHTS_FILE))   # handles tied (shared) tensors


def read_checkpoint(source: str | Path) -> dict[str, torch.Tensor]:
    """A local checkpoint.pt, or the one in an OpenFlamingo hub repo. Read with weights_only=True: a
    checkpoint is data, never code."""
    if not Path(source).exists():
        if re.fullmatch(r"[\w.-]+/[\w.-]+", str(source)):
            from huggingface_hub import hf_hub_download
            source = hf_hub_download(str(source), "checkpoint.pt")
        else:
            raise FileNotFoundError(f"no checkpoint at {source}")
    state = torch.load(source, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping):
        raise ValueError(f"{source} is not a state dict")
    return dict(state.get("model_state_dict", state))


def openflamingo_key_map(model: Flamingo) -> dict[str, str]:
    """Alias prefixes of OpenFlamingo's module tree -> our names."""
    path = model.config.decoder_layers_attr_name
    assert path is not None  # a built model's config is complete
    layers = "lang_encoder." + path
    return {
        r"^lang_encoder\.gated_cross_attn_layers\.(\d+)\.": layers + r".\1.gated_cross_attn_layer.",
        r"^lang_encoder\.old_decoder_blocks\.(\d+)\.": layers + r".\1.decoder_layer.",
    }


def load_openflamingo_checkpoint(model: Flamingo, source) -> None:
    state = source if isinstance(source, Mapping) else read_checkpoint(source)
    ours = model.state_dict()
    renames = openflamingo_key_map(model)
    embedding_key = f"lang_encoder.{input_embedding_path(model.lang_encoder)}.weight"

    mapped: dict[str, torch.Tensor] = {}
    unexpected, wrong_shape = [], []
    for key, value in state.items():
        name = key
        for pattern, target in renames.items():
            name = re.sub(pattern, target, name)
        if name not in ours:
            unexpected.append(key)
        elif tuple(value.shape) != tuple(ours[name].shape):
            wrong_shape.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(ours[name].shape)}")
        else:
            mapped[name] = value

    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    added = {f"lang_encoder.{name}.added_rows": module for name, module in model.lang_encoder.named_modules()
             if isinstance(module, AddedRows)}
    required = trained - OPTIONAL_KEYS - set(added)
    missing = sorted(required - set(mapped))
    if embedding_key not in mapped and embedding_key.removesuffix("weight") + "added_rows" not in mapped:
        missing.append(embedding_key)
    if unexpected or missing or wrong_shape:
        problems = []
        if missing:
            problems.append(f"missing keys: {', '.join(missing)}")
        if unexpected:
            problems.append(f"unexpected keys: {', '.join(sorted(unexpected))}")
        if wrong_shape:
            problems.append(f"wrong shapes: {'; '.join(wrong_shape)}")
        raise ValueError("checkpoint does not fit this model (" + " | ".join(problems) + ")")

    with torch.no_grad():
        params = {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers())}
        for name, value in mapped.items():
            params[name].copy_(value)
        for key, module in added.items():
            if key not in mapped:   # OpenFlamingo trains whole matrices: the added rows come from them
                module.reset_added_rows()
        if "perceiver.frame_embs" not in mapped and model.perceiver.frame_embs is not None:
            model.perceiver.frame_embs.zero_()
