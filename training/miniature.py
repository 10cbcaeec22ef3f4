"""The miniature Flamingo: the stage-1 vision tower and the stage-2 LM joined by fresh bridges, saved in
the project's format so stage 3 can start from it (`model: <out_dir>` in a `jobs/train_configs` YAML).

The gates start closed (tanh(0) = 0, as in the paper), so before stage 3 the model answers exactly like
its pretrained LM.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from flamingo.builder import build
from flamingo.config import FlamingoConfig
from training.pretrain_lm import load_lm
from training.pretrain_vision import load_vision


@dataclass(frozen=True)
class BridgeSizes:
    """Sizes of the trained parts, for 128-wide backbones (the tiny-random preset's, scaled up a little)."""

    num_latents: int = 16              # visual tokens per image: a 64 px scene holds at most 3 objects
    resampler_depth: int = 2
    resampler_heads: int = 4
    resampler_dim_head: int = 32
    xattn_heads: int = 4
    xattn_dim_head: int = 32
    ff_mult: int = 2
    max_num_frames: int = 8            # time embeddings: clips of up to 8 frames
    cross_attn_every_n_layers: int = 1


def build_miniature(vision_dir: str | Path, lm_dir: str | Path, out_dir: str | Path,
                    sizes: BridgeSizes = BridgeSizes(), seed: int = 0) -> Path:
    """Join the two pretrained backbones with fresh bridges (seeded by `seed`) and `save_pretrained` the
    result to `out_dir`, which `flamingo.load_model` then reads offline."""
    clip, clip_config = load_vision(vision_dir)
    lm, tokenizer = load_lm(lm_dir)
    # What the model is: a custom open_clip tower rebuilt from its config, an LM from its config (with the
    # tokenizer stage 2 trained), and the bridge sizes. The pretrained backbones are passed to `build` as they
    # are; only the bridges are new.
    config = FlamingoConfig(vision_encoder="custom", vision_encoder_pretrained=None, vision_encoder_config=clip_config,
                            lang_encoder="", lang_encoder_config=lm.config.to_dict(), tokenizer=str(lm_dir),
                            **dataclasses.asdict(sizes))
    model = build(config, seed, vision_encoder=clip, lang_encoder=lm, tokenizer=tokenizer)
    model.save_pretrained(out_dir)
    return Path(out_dir)
