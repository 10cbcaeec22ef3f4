"""Self-attention that reads a shared few-shot prefix once for the whole batch.

With a `FewShotPrefix`, every query row continues the same prompt. Copying the prefix's keys/values
into each row makes every decode step read them B times, so the cost per item grows with the number of
shots. Here the prefix stays at batch 1: each layer attends to [prefix keys (shared); the row's own keys]
with one softmax over both, which is the same attention, computed without the copies.

It is installed as an attention implementation of the LM (Hugging Face's AttentionInterface) for the
architectures whose attention goes through that interface and passes call arguments down to it (Llama
family, GPT-2, GPT-NeoX). Without a prefix in the call it is exactly the LM's SDPA attention. Other LMs
(MPT) keep per-row copies of the prefix: same results, more memory traffic.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "flamingo_shared_prefix_sdpa"
PREFIX_ARGUMENT = "flamingo_prefix_kv"   # list over layers of (keys, values), each (1, kv_heads, Lp, head_dim)
ARCHITECTURES = {"llama", "mistral", "qwen2", "gpt2", "gpt_neox"}


def install(lm: PreTrainedModel) -> bool:
    """Switch `lm` to this attention if it can take it; returns whether it did."""
    config = lm.config
    if config.model_type not in ARCHITECTURES or config._attn_implementation != "sdpa":
        return False
    AttentionInterface.register(NAME, shared_prefix_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    config._attn_implementation = NAME
    return True


def installed(lm: PreTrainedModel) -> bool:
    """Whether `lm` reads a shared prefix once for the batch (else each row gets its own copy)."""
    return lm.config._attn_implementation == NAME


def shared_prefix_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                            **kwargs) -> tuple[torch.Tensor, None]:
    prefix = kwargs.pop(PREFIX_ARGUMENT, None)
    if prefix is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    prefix_keys, prefix_values = prefix[module.layer_idx]
    groups = getattr(module, "num_key_value_groups", 1)
    b, h, length, d = query.shape                                         # own keys: (B, kv_heads, So, D)
    scale = scaling if scaling is not None else d ** -0.5
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    prefix_keys, prefix_values = repeat_kv(prefix_keys, groups)[0], repeat_kv(prefix_values, groups)[0]  # (H, Lp, D)

    rows = query.transpose(0, 1).reshape(h, b * length, d)               # (H, B*L, D): one read of the prefix
    to_prefix = torch.bmm(rows, prefix_keys.transpose(1, 2)).view(h, b, length, -1).transpose(0, 1) * scale
    to_own = torch.matmul(query, key.transpose(2, 3)) * scale           # (B, H, L, So)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            to_own = to_own.masked_fill(~attention_mask, torch.finfo(to_own.dtype).min)
        else:
            to_own = to_own + attention_mask
    elif length > 1:  # the mask was left out as plainly causal
        causal = torch.ones(length, key.shape[2], dtype=torch.bool, device=query.device).tril(key.shape[2] - length)
        to_own = to_own.masked_fill(~causal, torch.finfo(to_own.dtype).min)
    weights = torch.cat([to_prefix, to_own], dim=-1).softmax(-1, dtype=torch.float32).to(query.dtype)
    on_prefix, on_own = weights.split([prefix_keys.shape[1], key.shape[2]], dim=-1)
    from_prefix = torch.bmm(on_prefix.transpose(0, 1).reshape(h, b * length, -1), prefix_values)
    out = from_prefix.view(h, b, length, d).transpose(0, 1) + torch.matmul(on_own, value)   # (B, H, L, D)
    return out.transpose(1, 2).contiguous(), None
