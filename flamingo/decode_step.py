"""One decode step with fixed shapes: a token per row in, the next logits out.

Decoding runs the LM once per new token at a batch of one token per row, so what dominates is not arithmetic
but what every step pays around it: growing a cache, rebuilding the attention mask, Python dispatch of many
small ops. Here everything the steps share is allocated once, at its final size, before the first step:

- the LM's keys/values in a Hugging Face `StaticCache` of `prompt + new_tokens` slots (written in place);
- the attention mask as a 4-D additive mask over all those slots, handed to the LM as prepared (so it builds
  none); the slot of each new token is opened just before the token attends to it;
- the position of the next token, a tensor advanced in place;
- the visual keys/values of each gated block, computed when the prompt ran (`MediaConditioning.kv_cache`), and
  when a token sees only its row's last media (OpenFlamingo's rule), of that media alone, gathered once.

Every step then has the same shapes and touches the same buffers, which is what `torch.compile` needs to
fuse it into one graph (CPU: inductor; CUDA: CUDA graphs with mode="reduce-overhead"). Compiling is opt-in,
per model (`Flamingo.compile_decoding`, `bench --compile`): it costs minutes on a small CPU, once per batch
shape, and where it is unavailable or fails decoding goes on eagerly, which computes the same thing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from transformers import StaticCache
from transformers.cache_utils import CacheLayerMixin

from .gated_cross_attention import MediaConditioning
from .lm import ConditionedLM

log = logging.getLogger(__name__)


class DecodeStep:
    """The state decoding continues from, in buffers of fixed size; calling it appends one token per row."""

    def __init__(self, lm: ConditionedLM, cache: StaticCache, mask: torch.Tensor, positions: torch.Tensor,
                 filled: torch.Tensor, cond: MediaConditioning, prefix_kv: list | None):
        self.lm = lm
        self.cache = cache
        self.mask = mask              # (N, 1, 1, S + new) additive: 0 where a key may be seen, dtype min elsewhere
        self.positions = positions    # (N, 1) long: position id of the next token
        self.filled = filled          # (1,) long: slots of `cache` in use, i.e. where the next token's keys go
        self.cond = cond              # media_index (N, 1): the media every new token sees
        self.prefix_kv = prefix_kv    # a shared prefix's keys/values (batch 1), read by every row

    @classmethod
    def start(cls, lm: ConditionedLM, layers: list[tuple[torch.Tensor, torch.Tensor]], attention_mask: torch.Tensor,
              cond: MediaConditioning, prefix_kv: list | None, position_offset: int, new_tokens: int,
              repeat: int = 1) -> DecodeStep:
        """Move a prompt's keys/values (per layer (N, kv_heads, S, head_dim)) into buffers sized for
        `new_tokens` more tokens, each row repeated `repeat` times (beams)."""
        length = attention_mask.shape[1]
        cache = StaticCache(config=lm.config, max_cache_len=length + new_tokens)
        for (keys, values), target in zip(layers, cache.layers):
            keys, values = _repeat(keys, repeat), _repeat(values, repeat)
            layer = attention_layer(target)
            layer.lazy_initialization(keys, values)
            layer.update(keys, values)
        attention_mask = _repeat(attention_mask, repeat)
        dtype = layers[0][0].dtype
        visible = torch.cat([attention_mask.bool(), attention_mask.new_zeros(attention_mask.shape[0], new_tokens,
                                                                            dtype=torch.bool)], dim=1)
        mask = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
        mask = mask.masked_fill(~visible, torch.finfo(dtype).min)[:, None, None, :]
        # A new token's position follows the row's last real token: padding has no positions.
        positions = attention_mask.long().sum(-1, keepdim=True) + position_offset
        filled = torch.tensor([length], device=attention_mask.device)
        if lm.only_attend_immediate_media:
            cond = cond.last_media_only()   # a new token sees its row's last media: only its keys are kept
        media_index = cond.media_index[:, -1:]
        cond = MediaConditioning(_repeat(cond.visual_tokens, repeat), _repeat(media_index, repeat),
                                 {k: (_repeat(kv[0], repeat), _repeat(kv[1], repeat))
                                  for k, kv in cond.kv_cache.items()},
                                 any_media=bool((media_index >= 0).any()))
        return cls(lm, cache, mask, positions, filled, cond, prefix_kv)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append `tokens` (N,) and return the logits (N, V) of the token after them, in float32."""
        compiled = self.lm.compiled_step
        if compiled is None:
            return step(self.lm, self, tokens)
        try:
            return compiled(self.lm, self, tokens)
        except Exception as error:  # noqa: BLE001  compiling failed (no compiler, an op it cannot trace...)
            log.warning("torch.compile of the decode step failed, decoding eagerly from now on: %s", _one_line(error))
            self.lm.compiled_step = None
            for layer in self.cache.layers:   # a step that failed part-way must not have moved the cache on
                lengths = getattr(layer, "cumulative_length", None)
                if isinstance(lengths, torch.Tensor):
                    lengths.copy_(self.filled[0])
            return step(self.lm, self, tokens)

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep rows `rows` (beam search), in place: the buffers keep their addresses for a compiled step.
        Rows only move within an item, whose rows share mask, positions and media."""
        for layer in self.cache.layers:
            keys, values = attention_layer(layer).keys, attention_layer(layer).values
            assert keys is not None and values is not None  # filled by start()
            keys.copy_(keys.index_select(0, rows))
            values.copy_(values.index_select(0, rows))


def step(lm: ConditionedLM, state: DecodeStep, tokens: torch.Tensor) -> torch.Tensor:
    """The step itself, a function of buffers of fixed shapes (what `torch.compile` traces)."""
    state.mask.index_fill_(-1, state.filled, 0.0)        # the new token's own slot
    out = lm(tokens[:, None], state.mask, state.positions, state.cond, state.cache, prefix_kv=state.prefix_kv)
    state.positions.add_(1)
    state.filled.add_(1)
    if out.logits is None:
        raise RuntimeError("the language model returned no logits")
    return out.logits[:, -1].float()


def attention_layer(layer: object) -> CacheLayerMixin:
    """A cache layer of self-attention keys/values, the only kind the LMs Flamingo wraps have."""
    if not isinstance(layer, CacheLayerMixin):
        raise ValueError(f"the LM's cache has a {type(layer).__name__}, not self-attention keys/values; "
                         "Flamingo decodes only LMs whose every layer is attention")
    return layer


def _one_line(error: BaseException) -> str:
    """The root cause of a failed compile, in one line (torch wraps it in pages of advice)."""
    while True:
        inner = error.__cause__ or getattr(error, "inner_exception", None)   # dynamo's BackendCompilerFailed
        if not isinstance(inner, BaseException):
            break
        error = inner
    lines = [line for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0].strip() if lines else ''}"


def _repeat(t, n: int):
    return t if t is None or n == 1 else t.repeat_interleave(n, dim=0)


def compile_decode_step(lm: ConditionedLM, mode: str | None = None, backend: str | Callable = "inductor") -> bool:
    """Have `lm` decode with a compiled step from now on (traced at the first step of each new batch shape).
    Returns False, after one log line, where torch.compile is unavailable; a compile that fails at its
    first step falls back the same way. mode, backend: torch.compile's (CUDA: mode="reduce-overhead" for
    CUDA graphs)."""
    try:
        lm.compiled_step = torch.compile(step, mode=mode, backend=backend, dynamic=False)
    except Exception as error:  # noqa: BLE001  e.g. a Python or platform torch.compile does not support
        log.warning("torch.compile is unavailable, decoding eagerly: %s", _one_line(error))
        lm.compiled_step = None
    return lm.compiled_step is not None
