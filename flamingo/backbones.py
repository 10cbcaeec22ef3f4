"""The frozen backbones, made from the names or configs a `FlamingoConfig` holds: an open_clip vision
encoder, a Hugging Face causal LM and its tokenizer (or a byte-level one built in code, for tiny models)."""

from __future__ import annotations

import contextlib

import open_clip
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from torch import nn
from transformers import (
    CONFIG_MAPPING,
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from .conv_stem import build_clip
from .tokens import BYTE_LEVEL_TOKENIZER


def build_vision_encoder(name: str, pretrained: str | None, config: dict | None,
                         device: str | torch.device | None = None) -> nn.Module:
    """An open_clip model: by name (with a pretrained tag: downloads) or from a CLIP(...) config dict (which
    may add a convolutional stem, `flamingo.conv_stem`). `device="meta"` makes it without memory, to count its
    parameters."""
    # open_clip moves what it creates to `device`: make it there to begin with.
    with torch.device(device) if device is not None else contextlib.nullcontext():
        if config is not None:
            return build_clip(config)
        return open_clip.create_model(name, pretrained=pretrained, device=device or "cpu")


def lang_encoder_config(name: str, config: dict | None, trust_remote_code: bool = False) -> PreTrainedConfig:
    """The HF config of the LM a Flamingo config names (a config dict, or a hub id / local path), without the
    LM. Remote code is run only when the caller allows it; transformers itself refuses a model that needs it."""
    if config is None:
        return AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    config = dict(config)
    model_type = config.pop("model_type", None)
    if model_type not in CONFIG_MAPPING:
        # AutoConfig.for_model would list every known type; say what is wrong instead.
        raise ValueError(f"lang_encoder_config has model_type {model_type!r}, which transformers "
                         f"{transformers.__version__} does not know; an LM built from a config must be one of its "
                         "own architectures (e.g. 'llama', 'gpt2', 'gpt_neox', 'mpt')")
    return AutoConfig.for_model(model_type, **config)


def build_lang_encoder(name: str, config: dict | None, trust_remote_code: bool = False) -> PreTrainedModel:
    """An HF causal LM: from the hub/a local path, or with random weights from a config dict."""
    if config is not None:
        return AutoModelForCausalLM.from_config(lang_encoder_config(name, config, trust_remote_code),
                                                trust_remote_code=trust_remote_code)
    return AutoModelForCausalLM.from_pretrained(name, trust_remote_code=trust_remote_code)


def build_tokenizer(name: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    if name == BYTE_LEVEL_TOKENIZER:
        return byte_level_tokenizer()
    return AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with no merges: 256 byte tokens plus an end-of-text token. Built in code,
    so tiny models can be created and saved on a machine with no model hub."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<|endoftext|>"] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
