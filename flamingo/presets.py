"""Models known by name: presets (architectures as `FlamingoConfig` data) and the trained models bundled in
the package. Light (no torch): pipeline drivers resolve names and image preprocessing without a model.

Build a preset with `flamingo.from_preset(name)`; `from_name(name)` gives its config.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from .config import FlamingoConfig
from .tokens import BYTE_LEVEL_TOKENIZER

# Trained models shipped inside the package (save_pretrained folders with a model card), loadable by name.
BUNDLED_DIR = Path(__file__).parent / "weights"
DEFAULT_MODEL = "miniature"          # what `run`, `demo` and `eval` use without --model: no download


def _openflamingo(lm: str, every: int, checkpoint: str, remote_code: bool = False) -> FlamingoConfig:
    """A released OpenFlamingo model (Awadalla et al., 2023): CLIP ViT-L-14, a hub LM, trained bridges."""
    return FlamingoConfig(vision_encoder="ViT-L-14", vision_encoder_pretrained="openai", image_size=224,
                          lang_encoder=lm, tokenizer=lm, cross_attn_every_n_layers=every,
                          openflamingo_checkpoint=checkpoint, trust_remote_code=remote_code)


# Backbones of a few hundred kB, built in code: no download, deterministic from a seed.
TINY_VISION = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 8, "vocab_size": 16, "width": 32, "heads": 2, "layers": 1},
}
TINY_LM = {
    "model_type": "llama", "vocab_size": 257, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 2048, "bos_token_id": 256,
    "eos_token_id": 256, "tie_word_embeddings": False,
}
# FlamingoConfig fields (of several types), spread into the presets below.
_TINY_BACKBONES: dict[str, Any] = dict(
    vision_encoder="custom", vision_encoder_pretrained=None, vision_encoder_config=TINY_VISION, image_size=32,
    lang_encoder_config=TINY_LM, tokenizer=BYTE_LEVEL_TOKENIZER)

PRESETS: dict[str, FlamingoConfig] = {
    # MPT-1B ships its own modelling code, so those two need trust_remote_code, which from_preset and
    # load_model only pass on when the caller opts in.
    "openflamingo/OpenFlamingo-3B-vitl-mpt1b": _openflamingo(
        "anas-awadalla/mpt-1b-redpajama-200b", 1, "openflamingo/OpenFlamingo-3B-vitl-mpt1b", True),
    "openflamingo/OpenFlamingo-3B-vitl-mpt1b-langinstruct": _openflamingo(
        "anas-awadalla/mpt-1b-redpajama-200b-dolly", 1, "openflamingo/OpenFlamingo-3B-vitl-mpt1b-langinstruct", True),
    "openflamingo/OpenFlamingo-4B-vitl-rpj3b": _openflamingo(
        "togethercomputer/RedPajama-INCITE-Base-3B-v1", 2, "openflamingo/OpenFlamingo-4B-vitl-rpj3b"),
    "openflamingo/OpenFlamingo-4B-vitl-rpj3b-langinstruct": _openflamingo(
        "togethercomputer/RedPajama-INCITE-Instruct-3B-v1", 2, "openflamingo/OpenFlamingo-4B-vitl-rpj3b-langinstruct"),
    "openflamingo/OpenFlamingo-9B-vitl-mpt7b": _openflamingo(
        "anas-awadalla/mpt-7b", 4, "openflamingo/OpenFlamingo-9B-vitl-mpt7b"),
    # A tiny random model for tests and smoke runs.
    "tiny-random": FlamingoConfig(
        **_TINY_BACKBONES, num_latents=8, resampler_depth=2, resampler_heads=2, resampler_dim_head=16,
        xattn_heads=2, xattn_dim_head=16, ff_mult=2, max_num_frames=8, gate_init=0.5),
    # The same backbones with OpenFlamingo's own (fixed) bridge sizes, for side-by-side runs of its code.
    "tiny-random-openflamingo": FlamingoConfig(**_TINY_BACKBONES, max_num_frames=0, gate_init=0.5),
    # Random models of real sizes, for benchmarks (speed does not depend on the weights).
    "random-vits32-llama8": FlamingoConfig(
        vision_encoder="ViT-S-32", vision_encoder_pretrained=None, image_size=224, tokenizer=BYTE_LEVEL_TOKENIZER,
        lang_encoder_config={
            "model_type": "llama", "vocab_size": 32000, "hidden_size": 512, "intermediate_size": 1376,
            "num_hidden_layers": 8, "num_attention_heads": 8, "max_position_embeddings": 4096,
            "bos_token_id": 256, "eos_token_id": 256,
        },
        gate_init=0.5,
    ),
    "random-openflamingo-3b": FlamingoConfig(  # ViT-L-14 + an MPT-1B-shaped LM, cross-attention every layer
        vision_encoder="ViT-L-14", vision_encoder_pretrained=None, image_size=224, tokenizer=BYTE_LEVEL_TOKENIZER,
        lang_encoder_config={
            "model_type": "mpt", "vocab_size": 50432, "d_model": 2048, "n_layers": 24, "n_heads": 16,
            "expansion_ratio": 4, "max_seq_len": 2048, "bos_token_id": 256, "eos_token_id": 256,
        },
        gate_init=0.5,
    ),
}
ALIASES = {
    "openflamingo-3b": "openflamingo/OpenFlamingo-3B-vitl-mpt1b",
    "openflamingo-3b-instruct": "openflamingo/OpenFlamingo-3B-vitl-mpt1b-langinstruct",
    "openflamingo-4b": "openflamingo/OpenFlamingo-4B-vitl-rpj3b",
    "openflamingo-4b-instruct": "openflamingo/OpenFlamingo-4B-vitl-rpj3b-langinstruct",
    "openflamingo-9b": "openflamingo/OpenFlamingo-9B-vitl-mpt7b",
}


def is_preset(name: str) -> bool:
    return ALIASES.get(name, name) in PRESETS


def from_name(name: str) -> FlamingoConfig:
    """The config of a preset (or alias): a copy, so callers may change it."""
    if not is_preset(name):
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS) + sorted(ALIASES))}")
    return copy.deepcopy(PRESETS[ALIASES.get(name, name)])


def bundled_models() -> list[str]:
    if not BUNDLED_DIR.is_dir():
        return []
    return sorted(p.name for p in BUNDLED_DIR.iterdir() if (p / "config.json").is_file())


def saved_folder(name_or_path: str) -> Path | None:
    """The save_pretrained folder a name refers to: a path, or the name of a bundled model."""
    for folder in (Path(name_or_path), BUNDLED_DIR / name_or_path):
        if (folder / "config.json").is_file():
            return folder
    return None


def image_preprocessing(name_or_path: str) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
    """(image_size, mean, std) of a model without building it, so CPU decode tasks can preprocess."""
    folder = saved_folder(name_or_path)
    if folder is not None:
        config = FlamingoConfig.load(folder / "config.json")
    elif is_preset(name_or_path):
        config = from_name(name_or_path)
    else:
        raise ValueError(f"{name_or_path!r} is neither a saved model folder nor a preset")
    if config.image_size is None:  # saved configs are complete, and every preset states it
        raise ValueError(f"{name_or_path!r} does not state its image_size; it is known only once the model is built")
    return config.image_size, tuple(config.image_mean), tuple(config.image_std)
