"""Flamingo's special tokens and a tokenizer that needs no download (for tiny test models)."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

MEDIA_TOKEN = "<image>"
END_OF_CHUNK_TOKEN = "<|endofchunk|>"
PAD_TOKEN = "<PAD>"


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


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with no merges: 256 byte tokens plus an end-of-text token. Built in code,
    so tiny models can be created and saved on a machine with no model hub."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<|endoftext|>"] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
