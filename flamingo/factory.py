"""Building models: presets (architectures as data), backbones from names or configs, and the
OpenFlamingo-compatible `create_model_and_transforms`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import open_clip
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from .config import FlamingoConfig
from .model import Flamingo
from .tokens import byte_level_tokenizer

BYTE_LEVEL_TOKENIZER = "byte-level"  # built in code: see tokens.byte_level_tokenizer
# Trained models shipped inside the package (save_pretrained folders with a model card), loadable by name.
BUNDLED_DIR = Path(__file__).parent / "weights"
DEFAULT_MODEL = "miniature"          # what `run`, `demo` and `eval` use without --model: no download


@dataclass(frozen=True)
class Preset:
    vision_encoder: str                       # open_clip name ("custom" with vision_encoder_config)
    vision_encoder_pretrained: str | None
    lang_encoder: str                         # hub id ("" with lang_encoder_config)
    tokenizer: str
    cross_attn_every_n_layers: int
    checkpoint: str | None = None             # hub repo holding OpenFlamingo's checkpoint.pt
    trust_remote_code: bool = False
    vision_encoder_config: dict | None = None
    lang_encoder_config: dict | None = None
    overrides: dict = field(default_factory=dict)  # other FlamingoConfig fields
    gate_init: float | None = None            # random test models: open the gates so images matter


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


def _openflamingo(lm: str, every: int, checkpoint: str, remote_code: bool = False) -> Preset:
    return Preset("ViT-L-14", "openai", lm, lm, every, checkpoint, remote_code)


PRESETS: dict[str, Preset] = {
    # The released OpenFlamingo models (Awadalla et al., 2023). MPT-1B ships its own modelling code, so
    # those two need trust_remote_code, which load_model only passes when the caller opts in.
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
    "tiny-random": Preset(
        "custom", None, "", BYTE_LEVEL_TOKENIZER, 1,
        vision_encoder_config=TINY_VISION, lang_encoder_config=TINY_LM,
        overrides={"num_latents": 8, "resampler_depth": 2, "resampler_heads": 2, "resampler_dim_head": 16,
                   "xattn_heads": 2, "xattn_dim_head": 16, "ff_mult": 2, "max_num_frames": 8},
        gate_init=0.5,
    ),
    # The same backbones with OpenFlamingo's own (fixed) bridge sizes, for side-by-side runs of its code.
    "tiny-random-openflamingo": Preset("custom", None, "", BYTE_LEVEL_TOKENIZER, 1,
                                       vision_encoder_config=TINY_VISION, lang_encoder_config=TINY_LM,
                                       overrides={"max_num_frames": 0}, gate_init=0.5),
    # Random models of real sizes, for benchmarks (speed does not depend on the weights).
    "random-vits32-llama8": Preset(
        "ViT-S-32", None, "", BYTE_LEVEL_TOKENIZER, 1,
        lang_encoder_config={
            "model_type": "llama", "vocab_size": 32000, "hidden_size": 512, "intermediate_size": 1376,
            "num_hidden_layers": 8, "num_attention_heads": 8, "max_position_embeddings": 4096,
            "bos_token_id": 256, "eos_token_id": 256,
        },
        gate_init=0.5,
    ),
    "random-openflamingo-3b": Preset(  # ViT-L-14 + an MPT-1B-shaped LM, cross-attention every layer
        "ViT-L-14", None, "", BYTE_LEVEL_TOKENIZER, 1,
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


def resolve_preset(name: str) -> Preset | None:
    return PRESETS.get(ALIASES.get(name, name))


def from_preset(name: str, seed: int = 0, load_checkpoint: bool = True, trust_remote_code: bool = False,
                **overrides) -> Flamingo:
    """Build a preset. Released models download their backbones and checkpoint from the hub; random
    presets are built from their configs, seeded, without touching the global RNG."""
    preset = resolve_preset(name)
    if preset is None:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS) + sorted(ALIASES))}")
    if preset.trust_remote_code and not trust_remote_code:
        raise ValueError(f"{name} needs its LM's own code from the hub ({preset.lang_encoder}); pass "
                         "trust_remote_code=True if you trust it")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clip = build_vision_encoder(preset.vision_encoder, preset.vision_encoder_pretrained,
                                    preset.vision_encoder_config)
        lm = build_lang_encoder(preset.lang_encoder, preset.lang_encoder_config, trust_remote_code)
        tokenizer = build_tokenizer(preset.tokenizer, trust_remote_code)
        model = Flamingo.from_backbones(clip, lm, tokenizer, preset.cross_attn_every_n_layers,
                                        **{**preset.overrides, **overrides})
        _record_sources(model, vision_encoder=preset.vision_encoder,
                        vision_encoder_pretrained=preset.vision_encoder_pretrained,
                        vision_encoder_config=preset.vision_encoder_config, lang_encoder=preset.lang_encoder,
                        lang_encoder_config=preset.lang_encoder_config, tokenizer=preset.tokenizer,
                        trust_remote_code=preset.trust_remote_code)
        if preset.gate_init is not None:
            with torch.no_grad():
                for block in model.gated_cross_attn_layers():
                    block.attn_gate.fill_(preset.gate_init)
                    block.ff_gate.fill_(preset.gate_init)
    if preset.checkpoint and load_checkpoint:
        model.load_openflamingo_checkpoint(preset.checkpoint)
    return model


def _record_sources(model: Flamingo, **sources) -> None:
    """Remember where the backbones came from (metadata for save_pretrained and model cards)."""
    model.config = dataclasses.replace(model.config, **sources)


def bundled_models() -> list[str]:
    return sorted(p.name for p in BUNDLED_DIR.iterdir() if (p / "config.json").is_file()) if BUNDLED_DIR.is_dir() else []


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
        return config.image_size, tuple(config.image_mean), tuple(config.image_std)
    preset = resolve_preset(name_or_path)
    if preset is None:
        raise ValueError(f"{name_or_path!r} is neither a saved model folder nor a preset")
    vision = (preset.vision_encoder_config or open_clip.get_model_config(preset.vision_encoder))["vision_cfg"]
    size = vision["image_size"]
    defaults = FlamingoConfig()
    return (size[0] if isinstance(size, (list, tuple)) else size), defaults.image_mean, defaults.image_std


def load_model(name_or_path: str, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
               trust_remote_code: bool = False) -> Flamingo:
    """The one way the pipeline gets a model: a `save_pretrained` folder, a bundled model's name
    ('miniature'), or a preset name or hub id."""
    folder = saved_folder(name_or_path)
    if folder is not None:
        model = Flamingo.from_pretrained(folder)
    elif resolve_preset(name_or_path) is not None:
        model = from_preset(name_or_path, trust_remote_code=trust_remote_code)
    else:
        raise ValueError(f"{name_or_path!r} is neither a saved model folder, a bundled model "
                         f"({', '.join(bundled_models())}) nor a preset ({', '.join(sorted(PRESETS))})")
    return model.to(device=device, dtype=dtype)


def create_model_and_transforms(clip_vision_encoder_path: str, clip_vision_encoder_pretrained: str | None,
                                lang_encoder_path: str, tokenizer_path: str, cross_attn_every_n_layers: int = 1,
                                decoder_layers_attr_name: str | None = None, trust_remote_code: bool = False,
                                **flamingo_kwargs):
    """OpenFlamingo's factory, same arguments and return: (model, image_processor, tokenizer)."""
    clip, _, image_processor = open_clip.create_model_and_transforms(
        clip_vision_encoder_path, pretrained=clip_vision_encoder_pretrained)
    tokenizer = build_tokenizer(tokenizer_path, trust_remote_code)
    lm = build_lang_encoder(lang_encoder_path, None, trust_remote_code)
    known = {f.name for f in dataclasses.fields(FlamingoConfig)}
    unknown = sorted(set(flamingo_kwargs) - known)
    if unknown:
        raise TypeError(f"unknown arguments: {', '.join(unknown)}")
    model = Flamingo.from_backbones(clip, lm, tokenizer, cross_attn_every_n_layers, decoder_layers_attr_name,
                                    **flamingo_kwargs)
    _record_sources(model, vision_encoder=clip_vision_encoder_path,
                    vision_encoder_pretrained=clip_vision_encoder_pretrained, lang_encoder=lang_encoder_path,
                    tokenizer=tokenizer_path, trust_remote_code=trust_remote_code)
    return model, image_processor, model.tokenizer
