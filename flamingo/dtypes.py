"""The dtypes a model can be loaded in, by name, and what `auto` means on a device.

Kept apart from the factory so that the commands can list and check the names without importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DTYPES = ("auto", "float32", "bfloat16", "float16")


def check_dtype(name: str) -> str:
    """`name` if it is one of DTYPES, else a ValueError of one line."""
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}: choose one of {', '.join(DTYPES)}")
    return name


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device | None = None) -> torch.dtype:
    """`dtype` as a torch dtype; `auto` (or None) is bfloat16 on a CUDA device and float32 elsewhere.

    bfloat16 on a GPU halves the weights' memory and the bytes each decoding step reads, at float32's range.
    On a CPU float32 stays the default, as the gain depends on the chip (AMX-BF16 or not); bfloat16 and
    float16 can still be asked for there (both run on the CPU with this PyTorch)."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    name = check_dtype(dtype or "auto")
    if name == "auto":
        return torch.bfloat16 if torch.device(device or "cpu").type == "cuda" else torch.float32
    return getattr(torch, name)
