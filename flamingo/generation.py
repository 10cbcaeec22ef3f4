"""Decoding for Flamingo: greedy, sampling and beam search over the LM's KV cache, candidate scoring, and
the shared few-shot prefix. Everything here drives a `ConditionedLM` (the wrapped LM and its call path), never
the whole Flamingo model: the vision side has run before, and its visual tokens come in as arguments.

Three costs are paid once, not per token or per beam: the vision encoder (once per item), the visual
keys/values of each gated block (once per call, cached in the `MediaConditioning`), and, with a
`FewShotPrefix`, the whole demonstration part of the prompt (once per task). Under image-causal masking the
query tokens never attend to the demonstrations' images, only to their self-attention keys/values, so
reusing a prefix is exact.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import overload

import torch
from transformers import DynamicCache
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.modeling_outputs import CausalLMOutputWithPast

from .decode_step import DecodeStep, attention_layer
from .gated_cross_attention import MediaConditioning
from .lm import ConditionedLM, positions_from_mask

NEG_INF = -1.0e9


@dataclass
class FewShotPrefix:
    """A fixed start of every prompt (instruction + demonstrations), computed once at batch size 1."""

    input_ids: torch.Tensor             # (1, Lp)
    cache: DynamicCache                 # self-attention keys/values of the Lp prefix tokens
    # (1, T, n, D_vis): the prefix's media that text right after it attends to: its last one (OpenFlamingo's
    # rule, T = 1), or all of them for a model whose tokens see every earlier media; None: it has none.
    media: torch.Tensor | None

    @property
    def length(self) -> int:
        return self.input_ids.shape[1]

    def key_values(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (keys, values), each (1, kv_heads, Lp, head_dim), for shared-prefix attention."""
        return [_keys_values(layer) for layer in self.cache.layers]


@dataclass
class GenerationOutput:
    sequences: torch.Tensor             # (B, L + new): prompt then generated tokens, as HF/OpenFlamingo return
    new_tokens: torch.Tensor            # (B, new) generated tokens, padded with the pad id after a stop
    num_new_tokens: torch.Tensor        # (B,) tokens generated, the stop token included
    mean_logprob: torch.Tensor          # (B,) mean log-probability of those tokens under the model


@dataclass
class _Prompt:
    """A prompt that has been run through the model: where decoding continues from."""

    last_logits: torch.Tensor           # (B, V) logits for the first new token
    cache: DynamicCache
    attention_mask: torch.Tensor        # (B, S): prefix + prompt tokens, 0 on padding
    cond: MediaConditioning             # media of the continuation; media_index (B, 1) = last media per row
    prefix_kv: list | None = None       # a shared prefix's keys/values (batch 1), not copied into `cache`
    position_offset: int = 0            # its length: positions of the tokens in `cache` start after it

    def expand(self, n: int) -> _Prompt:
        """Repeat each row n times (beams, candidates) without recomputing anything. The cache is
        expanded in place: use only the returned state afterwards."""
        if n == 1:
            return self
        self.cache.batch_repeat_interleave(n)
        return _Prompt(_repeat(self.last_logits, n), self.cache, _repeat(self.attention_mask, n),
                       _repeat_conditioning(self.cond, n), prefix_kv=self.prefix_kv,
                       position_offset=self.position_offset)

    def for_decoding(self, lm: ConditionedLM, new_tokens: int, n: int = 1) -> DecodeStep:
        """The state as fixed-size buffers for `new_tokens` more tokens, each row repeated n times (beams)."""
        layers = [_keys_values(layer) for layer in self.cache.layers]
        return DecodeStep.start(lm, layers, self.attention_mask, self.cond, self.prefix_kv, self.position_offset,
                                new_tokens, n)

    def positions(self, mask: torch.Tensor, count: int) -> torch.Tensor:
        """Position ids of the last `count` tokens of `mask`."""
        return _positions(mask, count, self.position_offset)


def _positions(mask: torch.Tensor, count: int, offset: int) -> torch.Tensor:
    """Position ids of the last `count` tokens of `mask`, after `offset` tokens not in it (a shared prefix)."""
    return positions_from_mask(mask)[:, -count:] + offset


def _keys_values(layer: object) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys, values) of a cache layer that the prompt has filled."""
    layer = attention_layer(layer)
    if layer.keys is None or layer.values is None:
        raise ValueError("a layer of the LM's cache is empty: the prompt did not run through every layer")
    return layer.keys, layer.values


def _logits(out: CausalLMOutputWithPast) -> torch.Tensor:
    if out.logits is None:
        raise RuntimeError("the language model returned no logits")
    return out.logits


@overload
def _repeat(t: torch.Tensor, n: int) -> torch.Tensor: ...
@overload
def _repeat(t: None, n: int) -> None: ...
def _repeat(t: torch.Tensor | None, n: int) -> torch.Tensor | None:
    return t if t is None or n == 1 else t.repeat_interleave(n, dim=0)


def _repeat_conditioning(cond: MediaConditioning, n: int) -> MediaConditioning:
    return MediaConditioning(_repeat(cond.visual_tokens, n), _repeat(cond.media_index, n),
                             {k: (_repeat(kv[0], n), _repeat(kv[1], n)) for k, kv in cond.kv_cache.items()})


def prepare_prefix(lm: ConditionedLM, lang_x: torch.Tensor, visual_tokens: torch.Tensor | None) -> FewShotPrefix:
    """Run the prefix once; an empty one (a zero-shot task without instruction) runs nothing and holds no
    keys/values, and `run_prompt` then runs the prompt as it would without a prefix."""
    if lang_x.shape[0] != 1:
        raise ValueError(f"a prefix is one prompt (batch 1), got batch {lang_x.shape[0]}")
    if lang_x.shape[1] == 0:
        return FewShotPrefix(lang_x, DynamicCache(), None)
    mask = torch.ones_like(lang_x)
    cond = lm.conditioning(lang_x, visual_tokens)
    cache = DynamicCache()
    lm(lang_x, mask, positions_from_mask(mask), cond, cache, logits_to_keep=1)
    last = int(cond.media_index[0, -1])
    media = None
    if last >= 0:
        assert visual_tokens is not None  # conditioning() refuses an <image> without media
        media = visual_tokens[:, last if lm.only_attend_immediate_media else 0:last + 1]
    return FewShotPrefix(lang_x, cache, media)


def run_prompt(lm: ConditionedLM, lang_x: torch.Tensor, attention_mask: torch.Tensor,
               visual_tokens: torch.Tensor | None, prefix: FewShotPrefix | None) -> _Prompt:
    """Run the prompt (after the prefix, if any) at batch B; return the state decoding continues from."""
    b = lang_x.shape[0]
    cache = DynamicCache()
    prefix_kv: list | None = None
    position_offset = 0
    media, media_offset = visual_tokens, 0
    if prefix is not None and prefix.length:   # an empty prefix is no prefix
        if prefix.media is not None and _sees_prefix_media(lm, lang_x, attention_mask):
            seen = prefix.media.expand(b, -1, -1, -1)
            media = seen if visual_tokens is None else torch.cat([seen, visual_tokens], dim=1)
            media_offset = seen.shape[1]
        if lm.shares_prefix_attention:   # the prefix stays at batch 1, read once per step for all rows
            prefix_kv, position_offset = prefix.key_values(), prefix.length
        else:                               # every row gets its own copy of the prefix's keys/values
            cache = copy.deepcopy(prefix.cache)
            cache.batch_repeat_interleave(b)
            attention_mask = torch.cat([attention_mask.new_ones(b, prefix.length), attention_mask], dim=1)
    cond = lm.conditioning(lang_x, media, media_offset=media_offset)
    out = lm(lang_x, attention_mask, _positions(attention_mask, lang_x.shape[1], position_offset), cond,
             cache, logits_to_keep=1, prefix_kv=prefix_kv)
    return _Prompt(_logits(out)[:, -1].float(), cache, attention_mask, cond.continued(cond.last_media_index()),
                   prefix_kv=prefix_kv, position_offset=position_offset)


def _sees_prefix_media(lm: ConditionedLM, lang_x: torch.Tensor, attention_mask: torch.Tensor) -> bool:
    """Whether any token of the prompt attends to the prefix's media: text before a row's first image does,
    and with a model whose tokens see every earlier media, all of it does. A prompt that starts with its
    image (the usual query) sees only its own, and the prefix's media then costs each row a projection of
    its keys/values that no token reads."""
    if not lm.only_attend_immediate_media:
        return True
    before_first_image = (lang_x == lm.media_token_id).long().cumsum(-1) == 0
    return bool((before_first_image & attention_mask.bool()).any())


def logits_processors(do_sample: bool, temperature: float, top_k: int, top_p: float,
                      extra: LogitsProcessorList | None, min_new_tokens: int = 0, prompt_length: int = 0,
                      stop_ids: torch.Tensor | None = None) -> LogitsProcessorList:
    processors = LogitsProcessorList(extra or [])
    if min_new_tokens > 0 and stop_ids is not None:
        processors.append(MinNewTokensLengthLogitsProcessor(prompt_length, min_new_tokens, stop_ids))
    if do_sample:
        if temperature != 1.0:
            processors.append(TemperatureLogitsWarper(temperature))
        if top_k > 0:
            processors.append(TopKLogitsWarper(top_k))
        if top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p))
    return processors


def decode_greedy_or_sample(lm: ConditionedLM, state: _Prompt, prompt_ids: torch.Tensor, max_new_tokens: int,
                            stop_ids: torch.Tensor, pad_id: int, do_sample: bool,
                            processors: LogitsProcessorList, generator: torch.Generator | None
                            ) -> GenerationOutput:
    b = prompt_ids.shape[0]
    decode = state.for_decoding(lm, max_new_tokens)
    sequences = prompt_ids
    finished = torch.zeros(b, dtype=torch.bool, device=prompt_ids.device)
    sum_logprob = torch.zeros(b, device=prompt_ids.device)
    num_tokens = torch.zeros(b, dtype=torch.long, device=prompt_ids.device)
    logits = state.last_logits
    for step in range(max_new_tokens):
        normaliser = logits.logsumexp(-1)                                  # of the model's own probabilities
        # transformers annotates ids as the legacy torch.LongTensor class; any long tensor is what it takes.
        scores = processors(sequences, logits)  # type: ignore[arg-type]
        if do_sample:
            token = torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(1)
        else:
            token = scores.argmax(-1)
        token = torch.where(finished, torch.full_like(token, pad_id), token)
        logprob = logits.gather(1, token[:, None]).squeeze(1) - normaliser   # log_softmax's, without (B, V) of it
        sum_logprob += torch.where(finished, 0.0, logprob)
        num_tokens += (~finished).long()
        sequences = torch.cat([sequences, token[:, None]], dim=1)
        finished |= torch.isin(token, stop_ids)
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        logits = decode(token)
    return GenerationOutput(sequences, sequences[:, prompt_ids.shape[1]:], num_tokens,
                            sum_logprob / num_tokens.clamp(min=1))


def decode_beam_search(lm: ConditionedLM, state: _Prompt, prompt_ids: torch.Tensor, max_new_tokens: int,
                       stop_ids: torch.Tensor, pad_id: int, num_beams: int, length_penalty: float,
                       processors: LogitsProcessorList) -> GenerationOutput:
    """Beam search with Hugging Face's rules (its default early-stopping heuristic and length penalty), so
    results match `generate(num_beams=K)`; written out here because the LM call is ours."""
    b, k, dev = prompt_ids.shape[0], num_beams, prompt_ids.device
    keep = max(2, 1 + len(stop_ids)) * k                                  # candidates kept per step
    decode = state.for_decoding(lm, max_new_tokens, k)
    running = torch.full((b, k, max_new_tokens), pad_id, dtype=torch.long, device=dev)
    running_scores = torch.full((b, k), NEG_INF, device=dev)
    running_scores[:, 0] = 0.0                                            # all beams start identical
    done = torch.full((b, k, max_new_tokens), pad_id, dtype=torch.long, device=dev)
    done_scores = torch.full((b, k), NEG_INF, device=dev)                 # length-normalised
    done_sums = torch.zeros(b, k, device=dev)
    done_lens = torch.ones(b, k, dtype=torch.long, device=dev)
    is_done = torch.zeros(b, k, dtype=torch.bool, device=dev)
    improvable = torch.ones(b, 1, dtype=torch.bool, device=dev)
    in_top_k = torch.arange(keep, device=dev) < k
    batch_offset = torch.arange(b, device=dev)[:, None] * k
    history = prompt_ids.repeat_interleave(k, dim=0)
    logits = _repeat(state.last_logits, k)
    for t in range(max_new_tokens):
        # (B*K, V), HF's order. transformers annotates ids as the legacy LongTensor class: any long tensor will do.
        logprobs = processors(history, logits.log_softmax(-1))  # type: ignore[arg-type]
        vocab = logprobs.shape[-1]
        total = (logprobs.view(b, k, vocab) + running_scores[..., None]).view(b, k * vocab)
        top_scores, top_index = total.topk(keep, dim=-1)                  # (B, keep)
        origin, token = top_index // vocab, top_index % vocab
        candidates = running.gather(1, origin[..., None].expand(-1, -1, max_new_tokens)).clone()
        candidates[:, :, t] = token
        hits_stop = torch.isin(token, stop_ids) | (t == max_new_tokens - 1)

        # Beams that go on: the best K candidates that did not stop.
        chosen = (top_scores + hits_stop.float() * NEG_INF).topk(k, dim=-1).indices
        running = candidates.gather(1, chosen[..., None].expand(-1, -1, max_new_tokens))
        running_scores = top_scores.gather(1, chosen)
        beam_index = (origin.gather(1, chosen) + batch_offset).view(-1)

        # Finished hypotheses: stopped candidates among the top K, if they beat the ones kept so far.
        normalised = top_scores / ((t + 1) ** length_penalty)
        normalised = normalised + (~(hits_stop & in_top_k) | ~improvable).float() * NEG_INF
        merged_scores = torch.cat([done_scores, normalised], 1)
        best = merged_scores.topk(k, dim=-1).indices
        done = torch.cat([done, candidates], 1).gather(1, best[..., None].expand(-1, -1, max_new_tokens))
        done_scores = merged_scores.gather(1, best)
        done_sums = torch.cat([done_sums, top_scores], 1).gather(1, best)
        done_lens = torch.cat([done_lens, done_lens.new_full((b, keep), t + 1)], 1).gather(1, best)
        is_done = torch.cat([is_done, hits_stop & in_top_k], 1).gather(1, best)

        worst_done = torch.where(is_done, done_scores.min(1, keepdim=True).values, torch.tensor(NEG_INF, device=dev))
        improvable &= (running_scores[:, :1] / ((t + 1) ** length_penalty) > worst_done).any(-1, keepdim=True)
        if not bool(improvable.any()) or bool(hits_stop.all()) or t == max_new_tokens - 1:
            break
        decode.reorder(beam_index)
        history = torch.cat([history[beam_index], running[:, :, t].reshape(-1, 1)], dim=1)
        logits = decode(running[:, :, t].reshape(-1))

    lens = done_lens[:, 0]
    new_tokens = done[:, 0, : int(lens.max())]
    new_tokens = torch.where(torch.arange(new_tokens.shape[1], device=dev) < lens[:, None], new_tokens, pad_id)
    return GenerationOutput(torch.cat([prompt_ids, new_tokens], 1), new_tokens, lens, done_sums[:, 0] / lens)


def score_candidates(lm: ConditionedLM, state: _Prompt, candidates: list[list[int]], pad_id: int,
                     length_normalize: bool) -> torch.Tensor:
    """Log-likelihood of each candidate continuation after each prompt: (B, K), all in one batched pass."""
    b, k = state.last_logits.shape[0], len(candidates)
    if k == 0 or any(len(c) == 0 for c in candidates):
        raise ValueError("every candidate needs at least one token")
    longest = max(len(c) for c in candidates)
    dev = state.last_logits.device
    tokens = torch.tensor([c + [pad_id] * (longest - len(c)) for c in candidates], device=dev)  # (K, M)
    valid = torch.tensor([[1] * len(c) + [0] * (longest - len(c)) for c in candidates], device=dev)
    first = state.last_logits.log_softmax(-1)[:, tokens[:, 0]]            # (B, K): first candidate token
    state = state.expand(k)
    tokens_bk, valid_bk = tokens.repeat(b, 1), valid.repeat(b, 1)          # (B*K, M)
    total = first.reshape(-1)
    if longest > 1:
        # Candidates are right-padded: their own tokens never see the padding that follows them.
        mask = torch.cat([state.attention_mask, valid_bk[:, :-1]], dim=1)
        cond = state.cond.continued(state.cond.media_index.expand(-1, longest - 1))
        out = lm(tokens_bk[:, :-1], mask, state.positions(mask, longest - 1), cond, state.cache,
                 prefix_kv=state.prefix_kv)
        logprobs = _logits(out).float().log_softmax(-1).gather(2, tokens_bk[:, 1:, None]).squeeze(2)
        total = total + (logprobs * valid_bk[:, 1:]).sum(1)
    scores = total.view(b, k)
    if length_normalize:
        scores = scores / valid.sum(1).to(scores.dtype)
    return scores
