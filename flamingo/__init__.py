"""flamingo: a stateless Flamingo model library (Alayrac et al., 2022) that loads OpenFlamingo checkpoints.

    import flamingo
    model = flamingo.load_model("tiny-random")            # or a save_pretrained folder, or an OpenFlamingo hub id
    model, image_processor, tokenizer = flamingo.create_model_and_transforms(...)   # OpenFlamingo's factory
"""

from .config import FlamingoConfig
from .factory import DEFAULT_MODEL, PRESETS, create_model_and_transforms, from_preset, load_model
from .generation import FewShotPrefix, GenerationOutput
from .model import Flamingo

__all__ = [
    "DEFAULT_MODEL", "Flamingo", "FlamingoConfig", "FewShotPrefix", "GenerationOutput", "PRESETS",
    "create_model_and_transforms", "from_preset", "load_model",
]
