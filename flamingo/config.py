"""Architecture as data: everything needed to rebuild a Flamingo model, saved as JSON next to its weights.

A config is a recipe: `flamingo.build(config)` (builder.py) makes the backbones it names, adds Flamingo's tokens
and wraps them. Fields left None are facts of the backbones (a tower's width, where an LM keeps its decoder
layers) and are read from them when the model is built, so the config a model carries is always complete.
Light on purpose (no torch): pipeline workers read configs without loading a model.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path


@dataclass
class FlamingoConfig:
    # --- frozen vision encoder (open_clip) ---
    vision_encoder: str = "ViT-L-14"          # open_clip model name, or "custom" with vision_encoder_config
    vision_encoder_pretrained: str | None = "openai"  # open_clip pretrained tag; None = random weights
    vision_encoder_config: dict | None = None  # kwargs of open_clip.CLIP(...) for small custom towers
    image_size: int | None = None              # the processor resizes and crops to this; None = the tower's own.
                                               # Presets state it so pipelines can preprocess without a model.
    image_mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP statistics
    image_std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711)

    # --- frozen language model (Hugging Face causal LM) ---
    lang_encoder: str = ""                     # hub id or local path; "" when built from lang_encoder_config
    lang_encoder_config: dict | None = None    # HF config dict (with model_type) for LMs built in code; it
                                               # describes the LM before Flamingo's tokens are added
    tokenizer: str = ""                        # hub id, local path or "byte-level" (built in code);
                                               # "" = the lang_encoder's own
    decoder_layers_attr_name: str | None = None  # e.g. "model.layers"; None = inferred from the architecture
    trust_remote_code: bool = False            # some released LMs (MPT-1B) need their own code: callers opt in

    # --- trained bridges ---
    cross_attn_every_n_layers: int = 1         # a gated block before every N-th decoder layer (1, 2, 4 in OpenFlamingo)
    vis_dim: int | None = None                 # width of the tower's patch tokens (ViT-L: 1024); None = read
    num_latents: int = 64                      # visual tokens per image or clip after resampling (paper: 64)
    resampler_depth: int = 6
    resampler_heads: int = 8
    resampler_dim_head: int = 64
    max_num_frames: int = 8                    # learned time embeddings for video; zero-initialised so images and
                                               # OpenFlamingo checkpoints (which have none) are unaffected
    xattn_heads: int = 8
    xattn_dim_head: int = 64
    ff_mult: int = 4
    only_attend_immediate_media: bool = True   # the paper's image-causal masking: text sees only the last image
    # Initial tanh-gate value of every gated block. 0 (the paper): a new model computes exactly its LM. Random
    # test and benchmark models use 0.5, so images change their output and tests of the media path test something.
    gate_init: float = 0.0

    # --- tokens ---
    media_token: str = "<image>"
    end_of_chunk_token: str = "<|endofchunk|>"
    added_token_ids: list[int] | None = None   # embedding rows that are trained; None = the tokens build adds

    # --- where trained weights come from ---
    # Hub repo whose checkpoint.pt holds the trained bridges of this architecture (OpenFlamingo's releases hold
    # only those). `from_preset` loads it; a saved model carries its weights and ignores it.
    openflamingo_checkpoint: str | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> FlamingoConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown Flamingo config fields: {', '.join(unknown)}")
        data = dict(data)
        for key in ("image_mean", "image_std"):
            if key in data:
                data[key] = tuple(data[key])
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> FlamingoConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))
