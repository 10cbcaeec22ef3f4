"""The frozen backbones, made from the names or configs a `FlamingoConfig` holds: an open_clip vision
encoder, a Hugging Face causal LM and its tokenizer (or a byte-level one built in code, for tiny models)."""

from __future__ import annotations

import open_clip
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from .tokens import BYTE_LEVEL_TOKENIZER


def build_vision_encoder(name: str, pretrained: str | None, config: dict | None) -> nn.Module:
    """An open_clip model: by name (with a pretrained tag: downloads) or from a CLIP(...) config dict."""
    if config is not None:
        return open_clip.CLIP(**config)
    return open_clip.create_model(name, pretrained=pretrained)


def build_lang_encoder(name: str, config: dict | None, trust_remote_code: bool = False) -> nn.Module:
    """An HF causal LM: from the hub/a local path, or with random weights from a config dict."""
    if config is not None:
        config = dict(config)
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(config.pop("model_type"), **config))
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
