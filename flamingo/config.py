"""Architecture as data: everything needed to rebuild a Flamingo model, saved as JSON next to its weights."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class FlamingoConfig:
    # --- frozen vision encoder (open_clip) ---
    vision_encoder: str = "ViT-L-14"          # open_clip model name, or "custom" with vision_encoder_config
    vision_encoder_pretrained: str | None = "openai"  # open_clip pretrained tag; None = random weights
    vision_encoder_config: dict | None = None  # kwargs of open_clip.CLIP(...) for small custom towers
    image_size: int = 224                      # the processor resizes and crops to this
    image_mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP statistics
    image_std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711)

    # --- frozen language model (Hugging Face causal LM) ---
    lang_encoder: str = ""                     # hub id or local path; "" when built from lang_encoder_config
    lang_encoder_config: dict | None = None    # HF config dict (with model_type) for LMs built in code
    tokenizer: str = ""                        # hub id or local path; defaults to lang_encoder
    decoder_layers_attr_name: str | None = None  # e.g. "model.layers"; None = inferred from the architecture
    trust_remote_code: bool = False            # some released LMs (MPT-1B) need their own code: opt in explicitly

    # --- trained bridges ---
    cross_attn_every_n_layers: int = 1         # a gated block before every N-th decoder layer (1, 2, 4 in OpenFlamingo)
    vis_dim: int = 1024                        # width of the vision tower's patch tokens (ViT-L: 1024)
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

    # --- tokens ---
    media_token: str = "<image>"
    end_of_chunk_token: str = "<|endofchunk|>"
    added_token_ids: list[int] = field(default_factory=list)  # rows of the embedding that are trained

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "FlamingoConfig":
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
    def load(cls, path: str | Path) -> "FlamingoConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))
