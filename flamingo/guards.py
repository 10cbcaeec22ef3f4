"""Checks made before a model is built from a folder, a name or a config someone else wrote.

Code: a model folder never runs code of its own unless the caller allows it. transformers imports Python files
from a model folder when it is asked with `trust_remote_code=True` and the folder's JSON names them (an
`auto_map`), so the permission must come from the caller (`trust_remote_code=True` on `load_model` and the
other entry points), never from a file. The config field of that name only says that a model needs it
(presets of LMs that ship their own code); a saved folder that asks for it, or carries an `auto_map`, is
refused with an error that says how to opt in.

Memory: the parts `build` is about to make are first made on PyTorch's meta device (shapes and dtypes, no
memory) and counted, so a config naming an LM of hundreds of GB is refused in about a second instead of
being allocated until the machine runs out.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from .backbones import build_vision_encoder, lang_encoder_config
from .config import FlamingoConfig
from .lm import decoder_layers, infer_decoder_layers_attr_name, lm_width, new_gated_block
from .model import new_perceiver
from .vision import patch_token_width


class UntrustedCodeError(ValueError):
    """A model would run code of its own, and the caller did not pass trust_remote_code=True."""


class ModelTooLargeError(ValueError):
    """Building the model would need more memory than the limit."""


# ------------------------------------------------------------------ code

def remote_code_requests(config: FlamingoConfig, tokenizer_dir: Path | None) -> list[str]:
    """Why loading a saved model would run code that came with it: one entry per file and field that asks."""
    reasons = []
    if config.trust_remote_code:
        reasons.append("config.json sets trust_remote_code")
    if "auto_map" in (config.lang_encoder_config or {}):
        reasons.append("lang_encoder_config in config.json has an auto_map")
    if tokenizer_dir is not None:
        # AutoTokenizer reads both: tokenizer_config.json first, config.json when that names no class.
        for name in ("tokenizer_config.json", "config.json"):
            file = tokenizer_dir / name
            if file.is_file() and "auto_map" in _json_object(file):
                reasons.append(f"{file.parent.name}/{name} has an auto_map")
    return reasons


def refuse_untrusted_code(folder: Path, config: FlamingoConfig, tokenizer_dir: Path | None) -> None:
    reasons = remote_code_requests(config, tokenizer_dir)
    if reasons:
        raise UntrustedCodeError(
            f"the model folder {folder} asks to run its own code ({'; '.join(reasons)}); code from a model "
            "folder never runs unless you allow it. If you trust this folder, pass trust_remote_code=True "
            "(on the command line: --trust-remote-code).")


def _json_object(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read {path}: {error}") from None
    return data if isinstance(data, dict) else {}


# ------------------------------------------------------------------ memory

def available_memory() -> int:
    """Bytes that can be allocated now without swapping: psutil's figure if installed, else the kernel's
    MemAvailable (free + reclaimable cache), else free pages (os.sysconf), which undercounts."""
    try:
        import psutil
        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def module_size(module: nn.Module) -> tuple[int, int]:
    """(elements, bytes) of a module's parameters and buffers, each shared tensor once; works on meta."""
    tensors = {id(t): t for t in (*module.parameters(), *module.buffers())}
    return (sum(t.numel() for t in tensors.values()),
            sum(t.numel() * t.element_size() for t in tensors.values()))


def estimate_build(config: FlamingoConfig, *, trust_remote_code: bool = False, vision_encoder: nn.Module | None = None,
                   lang_encoder: PreTrainedModel | None = None) -> dict[str, tuple[int, int]]:
    """(elements, bytes) of each part `build` would make from `config`, found by making them on the meta
    device: nothing is allocated, and the dtypes are those the real build uses. Backbones passed in exist
    already and are not counted; they still size the bridges."""
    parts = {}
    with torch.device("meta"):
        visual = vision_encoder
        if visual is None:
            visual = build_vision_encoder(config.vision_encoder, None, config.vision_encoder_config, device="meta")
            parts["vision encoder"] = module_size(visual)
        lm = lang_encoder
        if lm is None:
            lm = AutoModelForCausalLM.from_config(
                lang_encoder_config(config.lang_encoder, config.lang_encoder_config, trust_remote_code),
                trust_remote_code=trust_remote_code)
            parts["language model"] = module_size(lm)
        vis_dim = config.vis_dim or patch_token_width(getattr(visual, "visual", visual))
        layers = decoder_layers(lm, config.decoder_layers_attr_name or infer_decoder_layers_attr_name(lm))
        blocks = len(layers) // config.cross_attn_every_n_layers
        perceiver = module_size(new_perceiver(config, vis_dim))
        block = module_size(new_gated_block(config, lm_width(lm), vis_dim))
        parts["bridges"] = (perceiver[0] + blocks * block[0], perceiver[1] + blocks * block[1])
    return parts


def check_fits(config: FlamingoConfig, *, name: str, trust_remote_code: bool = False,
               max_bytes: float | None = None, vision_encoder: nn.Module | None = None,
               lang_encoder: PreTrainedModel | None = None, also: dict[str, int] | None = None) -> None:
    """Refuse to build a model whose parts (see `estimate_build`) plus `also` (bytes read alongside, e.g. a
    weights file) exceed `max_bytes`; None means the memory available now. `math.inf` skips the estimate."""
    if max_bytes is not None and math.isinf(max_bytes):
        return
    limit = available_memory() if max_bytes is None else max_bytes
    parts = estimate_build(config, trust_remote_code=trust_remote_code, vision_encoder=vision_encoder,
                           lang_encoder=lang_encoder)
    total = sum(size for _, size in parts.values()) + sum((also or {}).values())
    if total <= limit:
        return
    listed = [f"{part} {_count(n)} parameters, {_gib(size)}" for part, (n, size) in parts.items()]
    listed += [f"{part} {_gib(size)}" for part, size in (also or {}).items()]
    where = "of memory available now" if max_bytes is None else "limit (max_bytes)"
    raise ModelTooLargeError(
        f"{name} would need about {_gib(total)} to build ({'; '.join(listed)}), more than the {_gib(limit)} "
        f"{where}; nothing was allocated. Pass max_bytes= to set the limit yourself.")


def _gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB"


def _count(n: int) -> str:
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:,.1f}{unit}"
    return str(n)
