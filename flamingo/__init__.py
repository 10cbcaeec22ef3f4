"""flamingo: a stateless Flamingo model library (Alayrac et al., 2022) that loads OpenFlamingo checkpoints.

    import flamingo
    model = flamingo.load_model("tiny-random")            # or a save_pretrained folder, or an OpenFlamingo hub id
    model, image_processor, tokenizer = flamingo.create_model_and_transforms(...)   # OpenFlamingo's factory

Modules, lightest first (each imports only those before it):
    config, tokens, presets          FlamingoConfig, token strings, models by name (no torch)
    resampler, gated_cross_attention, vision, prefix_attention, backbones     the parts
    lm                               the wrapped LM and its call path (ConditionedLM)
    generation, checkpoint           decoding over a ConditionedLM; weights in and out
    model                            Flamingo
    guards                           before building: no code from a model folder, sizes checked
    builder                          config -> model (build, load_pretrained)
    factory                          from_preset, load_model, create_model_and_transforms

Names are imported on first use, so `import flamingo.tokens` or `flamingo.presets` does not load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "FlamingoConfig": "config",
    "DEFAULT_MODEL": "presets", "PRESETS": "presets", "image_preprocessing": "presets",
    "FewShotPrefix": "generation", "GenerationOutput": "generation",
    "Flamingo": "model",
    "ModelTooLargeError": "guards", "UntrustedCodeError": "guards",
    "build": "builder",
    "create_model_and_transforms": "factory", "from_preset": "factory", "load_model": "factory",
}
__all__ = [
    "DEFAULT_MODEL", "Flamingo", "FlamingoConfig", "FewShotPrefix", "GenerationOutput", "ModelTooLargeError",
    "PRESETS", "UntrustedCodeError", "build", "create_model_and_transforms", "from_preset", "image_preprocessing",
    "load_model",
]

if TYPE_CHECKING:
    from .builder import build
    from .config import FlamingoConfig
    from .factory import create_model_and_transforms, from_preset, load_model
    from .generation import FewShotPrefix, GenerationOutput
    from .guards import ModelTooLargeError, UntrustedCodeError
    from .model import Flamingo
    from .presets import DEFAULT_MODEL, PRESETS, image_preprocessing


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'flamingo' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
