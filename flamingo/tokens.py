"""Flamingo's special tokens, and adding them to a tokenizer. Light (no transformers import at run time), so
code that only writes prompts can import the token strings cheaply."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

MEDIA_TOKEN = "<image>"
END_OF_CHUNK_TOKEN = "<|endofchunk|>"
PAD_TOKEN = "<PAD>"
BYTE_LEVEL_TOKENIZER = "byte-level"   # a tokenizer name: the one built in code (backbones.byte_level_tokenizer)


def add_flamingo_tokens(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Add `<|endofchunk|>`, `<image>`, then a pad token if missing, in OpenFlamingo's order, so the rows of
    a released checkpoint's embedding line up. Returns the tokens that were new to this tokenizer."""
    vocab = tokenizer.get_vocab()
    new = [t for t in (END_OF_CHUNK_TOKEN, MEDIA_TOKEN) if t not in vocab]
    if new:
        tokenizer.add_special_tokens({"additional_special_tokens": [END_OF_CHUNK_TOKEN, MEDIA_TOKEN]},
                                     replace_extra_special_tokens=False)
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
        new.append(PAD_TOKEN)
    tokenizer.padding_side = "left"  # generation continues at the right end of every row
    return new
