"""Small random backbones for model tests: deterministic, built in code, no downloads."""

from __future__ import annotations

import copy

import open_clip
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from flamingo.backbones import byte_level_tokenizer
from flamingo.presets import PRESETS

VISION = PRESETS["tiny-random"].vision_encoder_config
VIS_DIM = VISION["vision_cfg"]["width"]
IMAGE_SIZE = VISION["vision_cfg"]["image_size"]

LM_CONFIGS = {
    "llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512),
    "gpt2": dict(n_embd=64, n_layer=4, n_head=4, n_positions=512),
    "gpt_neox": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                     max_position_embeddings=512),
    "mpt": dict(d_model=64, n_layers=4, n_heads=4, max_seq_len=512),
}


def make_clip(seed: int = 0):
    torch.manual_seed(seed)
    return open_clip.CLIP(**VISION).eval()


def make_lm(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    config = AutoConfig.for_model(arch, vocab_size=257, bos_token_id=256, eos_token_id=256, **LM_CONFIGS[arch])
    return AutoModelForCausalLM.from_config(config).eval()


def make_backbones(arch: str = "llama", seed: int = 0):
    """(clip, lm, tokenizer), each new."""
    return make_clip(seed), make_lm(arch, seed), byte_level_tokenizer()


def open_gates(model, attn: float = 0.7, ff: float = -0.4) -> None:
    """Gates start at 0 (the model is then the plain LM); open them so cross-attention matters."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("attn_gate"):
                p.fill_(attn)
            elif name.endswith("ff_gate"):
                p.fill_(ff)


def images(batch: int, media: int, frames: int = 1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, media, frames, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)


def clone(module):
    return copy.deepcopy(module)
