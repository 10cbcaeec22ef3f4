"""The Flamingo model: frozen open_clip vision encoder -> Perceiver Resampler -> frozen HF causal LM with
gated cross-attention blocks. The public surface follows OpenFlamingo (`forward`, `generate`,
`vision_x` shaped (B, T_media, F, C, H, W)); the faster paths (shared prefix, scoring) sit beside it.

Media are arguments of every call. Nothing about a call is left on the model afterwards, so calls with
different media can be made in any order, or from several threads.
"""

from __future__ import annotations

import inspect
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn
from transformers import LogitsProcessorList, PreTrainedTokenizerBase
from transformers.modeling_outputs import CausalLMOutputWithPast

from . import generation, prefix_attention
from .config import FlamingoConfig
from .gated_cross_attention import GatedCrossAttentionBlock, MediaConditioning
from .generation import FewShotPrefix, GenerationOutput
from .lm import (AddedRows, AddedTokenEmbedding, AddedTokenHead, ConditioningSlot,
                 infer_decoder_layers_attr_name, inject_flamingo_layers)
from .resampler import PerceiverResampler
from .tokens import add_flamingo_tokens
from .vision import FlamingoVision, encode_vision


class Flamingo(nn.Module):
    def __init__(self, vision_encoder: nn.Module, lang_encoder: nn.Module, tokenizer: PreTrainedTokenizerBase,
                 config: FlamingoConfig):
        """Prefer `Flamingo.from_backbones` (which adds the special tokens) or `flamingo.load_model`."""
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        tokenizer.padding_side = "left"
        vocab = tokenizer.get_vocab()
        missing = [t for t in (config.media_token, config.end_of_chunk_token) if t not in vocab]
        if missing:
            raise ValueError(f"the tokenizer lacks {missing}; build with Flamingo.from_backbones, which adds them")
        self.media_token_id = vocab[config.media_token]
        self.eoc_token_id = vocab[config.end_of_chunk_token]

        vision_encoder.output_tokens = True  # open_clip: visual(x) -> (pooled, patch tokens)
        self.vision_encoder = vision_encoder
        self.perceiver = PerceiverResampler(
            config.vis_dim, config.resampler_depth, config.resampler_dim_head, config.resampler_heads,
            config.num_latents, config.max_num_frames, config.ff_mult,
        )
        lang_dim = getattr(lang_encoder.config, "d_model", None) or lang_encoder.config.hidden_size  # MPT: d_model
        self._slot = ConditioningSlot()
        inject_flamingo_layers(
            lang_encoder, config.decoder_layers_attr_name, config.cross_attn_every_n_layers, lang_dim,
            config.vis_dim, config.xattn_heads, config.xattn_dim_head, config.ff_mult,
            config.only_attend_immediate_media, self._slot,
        )
        lang_encoder.set_input_embeddings(AddedTokenEmbedding(lang_encoder.get_input_embeddings(),
                                                              config.added_token_ids))
        if isinstance(lang_encoder.get_output_embeddings(), nn.Linear):
            lang_encoder.set_output_embeddings(AddedTokenHead(lang_encoder.get_output_embeddings(),
                                                              config.added_token_ids))
        self.lang_encoder = lang_encoder
        self._lm_arguments = set(inspect.signature(lang_encoder.forward).parameters)
        self.shares_prefix_attention = prefix_attention.install(lang_encoder)

        # Frozen backbones; trained: resampler, gated blocks, the added tokens' embedding rows.
        self.requires_grad_(False)
        self.perceiver.requires_grad_(True)
        for block in self.gated_cross_attn_layers():
            block.requires_grad_(True)
        for module in self.lang_encoder.modules():
            if isinstance(module, AddedRows):
                module.added_rows.requires_grad_(True)
        self.eval()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_backbones(cls, vision_encoder: nn.Module, lang_encoder: nn.Module,
                       tokenizer: PreTrainedTokenizerBase, cross_attn_every_n_layers: int = 1,
                       decoder_layers_attr_name: str | None = None, **config_overrides) -> "Flamingo":
        """Build from already constructed backbones: an open_clip model (or its `.visual`), an HF causal LM
        and its tokenizer. Adds the Flamingo tokens and resizes the LM's embeddings for them."""
        visual = getattr(vision_encoder, "visual", vision_encoder)
        image_size = visual.image_size
        image_size = image_size[0] if isinstance(image_size, (tuple, list)) else image_size
        new_tokens = add_flamingo_tokens(tokenizer)
        if len(tokenizer) > lang_encoder.get_input_embeddings().weight.shape[0]:  # LMs often pad their vocab
            lang_encoder.resize_token_embeddings(len(tokenizer))
        config = FlamingoConfig(
            cross_attn_every_n_layers=cross_attn_every_n_layers,
            decoder_layers_attr_name=decoder_layers_attr_name or infer_decoder_layers_attr_name(lang_encoder),
            vis_dim=_patch_token_width(visual),
            image_size=int(image_size),
            added_token_ids=tokenizer.convert_tokens_to_ids(
                new_tokens or [FlamingoConfig.end_of_chunk_token, FlamingoConfig.media_token]),
        )
        mean, std = getattr(visual, "image_mean", None), getattr(visual, "image_std", None)
        if mean is not None and std is not None:
            config = replace(config, image_mean=tuple(mean), image_std=tuple(std))
        config = replace(config, **config_overrides)
        return cls(visual, lang_encoder, tokenizer, config)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device | None = None) -> "Flamingo":
        """Load a model saved with `save_pretrained` (safetensors + JSON, no pickles)."""
        from .checkpoint import load_pretrained
        return load_pretrained(path, device=device)

    def save_pretrained(self, path: str | Path) -> None:
        from .checkpoint import save_pretrained
        save_pretrained(self, path)

    def load_openflamingo_checkpoint(self, path_or_state_dict) -> None:
        """Load a released OpenFlamingo `checkpoint.pt` (a path, a hub id, or a state dict)."""
        from .checkpoint import load_openflamingo_checkpoint
        load_openflamingo_checkpoint(self, path_or_state_dict)

    def gated_cross_attn_layers(self) -> list[GatedCrossAttentionBlock]:
        return [m for m in self.lang_encoder.modules() if isinstance(m, GatedCrossAttentionBlock)]

    def parameter_counts(self) -> dict[str, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return {"trainable": trainable, "frozen": total - trainable, "total": total}

    def train(self, mode: bool = True) -> "Flamingo":
        """Frozen backbones stay in eval mode (no dropout), whatever mode the bridges are in."""
        super().train(mode)
        self.vision_encoder.eval()
        self.lang_encoder.eval()
        for block in self.gated_cross_attn_layers():
            block.train(mode)
        return self

    @property
    def device(self) -> torch.device:
        return self.perceiver.latents.device

    @property
    def dtype(self) -> torch.dtype:
        return self.perceiver.latents.dtype

    # ------------------------------------------------------------------ the forward pieces
    def encode_vision(self, vision_x: torch.Tensor) -> torch.Tensor:
        """(B, T, F, C, H, W) pixels -> (B, T, num_latents, vis_dim) visual tokens."""
        return encode_vision(self.vision_encoder, self.perceiver, vision_x)

    def vision_part(self) -> FlamingoVision:
        """Encoder + resampler alone (same weights), e.g. to drop the LM where only vision runs."""
        return FlamingoVision(self.vision_encoder, self.perceiver)

    def media_conditioning(self, lang_x: torch.Tensor, visual_tokens: torch.Tensor | None,
                           media_offset: int = 0) -> MediaConditioning:
        """Which media each text token sees: the k-th `<image>` of a row is media k (+ media_offset)."""
        media_index = (lang_x == self.media_token_id).long().cumsum(-1) - 1 + media_offset   # (B, L)
        available = 0 if visual_tokens is None else visual_tokens.shape[1]
        needed = int(media_index.max()) + 1 if media_index.numel() else 0
        if needed > available:
            raise ValueError(f"the text has {needed - media_offset} {self.config.media_token} token(s) in a row "
                             f"but only {available - media_offset} media were given")
        if visual_tokens is not None:
            visual_tokens = visual_tokens.to(self.dtype)
        return MediaConditioning(visual_tokens, media_index)

    def run_lm(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
               cond: MediaConditioning | None, past_key_values=None, labels: torch.Tensor | None = None,
               logits_to_keep: int = 0, use_cache: bool = True, prefix_kv: list | None = None
               ) -> CausalLMOutputWithPast:
        """One LM call with the gated blocks seeing `cond` for exactly its duration. `prefix_kv`: keys/values
        of a shared prefix the tokens continue (see prefix_attention)."""
        kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, past_key_values=past_key_values,
                      use_cache=use_cache, labels=labels)
        if prefix_kv is not None:
            kwargs[prefix_attention.PREFIX_ARGUMENT] = prefix_kv
        if "position_ids" in self._lm_arguments:  # ALiBi models (MPT) take none: their bias is relative
            kwargs["position_ids"] = position_ids
        if logits_to_keep and "logits_to_keep" in self._lm_arguments:
            kwargs["logits_to_keep"] = logits_to_keep
        with self._slot.use(cond):
            return self.lang_encoder(**kwargs)

    def forward(self, vision_x: torch.Tensor | None = None, lang_x: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                past_key_values=None, use_cache: bool = False,
                visual_tokens: torch.Tensor | None = None) -> CausalLMOutputWithPast:
        """OpenFlamingo's forward. `visual_tokens` (from `encode_vision`) may replace `vision_x`. With
        `past_key_values` and no `<image>` in `lang_x`, the new tokens see the last media (as OpenFlamingo)."""
        if lang_x is None:
            raise ValueError("lang_x is required")
        if visual_tokens is None and vision_x is not None:
            visual_tokens = self.encode_vision(vision_x)
        if attention_mask is None:
            attention_mask = torch.ones_like(lang_x)
        cond = self.media_conditioning(lang_x, visual_tokens)
        past_len = 0
        if past_key_values is not None and past_key_values.get_seq_length() > 0:
            past_len = past_key_values.get_seq_length()
            if visual_tokens is not None and not bool((lang_x == self.media_token_id).any()):
                cond = cond.continued(torch.full_like(lang_x, visual_tokens.shape[1] - 1))
        full_mask = attention_mask
        if attention_mask.shape[1] == lang_x.shape[1] and past_len:
            full_mask = torch.cat([attention_mask.new_ones(lang_x.shape[0], past_len), attention_mask], 1)
        positions = generation.positions_from_mask(full_mask)[:, -lang_x.shape[1]:]
        return self.run_lm(lang_x, full_mask, positions, cond, past_key_values, labels=labels, use_cache=use_cache)

    # ------------------------------------------------------------------ generation and scoring
    @torch.inference_mode()
    def prepare_prefix(self, lang_x: torch.Tensor, vision_x: torch.Tensor | None = None,
                       visual_tokens: torch.Tensor | None = None) -> FewShotPrefix:
        """Compute a fixed few-shot prefix once (batch 1): its visual tokens and its KV cache."""
        if visual_tokens is None and vision_x is not None:
            visual_tokens = self.encode_vision(vision_x)
        return generation.prepare_prefix(self, lang_x.to(self.device), visual_tokens)

    @torch.inference_mode()
    def generate(self, vision_x: torch.Tensor | None = None, lang_x: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, *, visual_tokens: torch.Tensor | None = None,
                 prefix: FewShotPrefix | None = None, max_new_tokens: int = 20, min_new_tokens: int = 0,
                 num_beams: int = 1,
                 do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 length_penalty: float = 1.0, eos_token_id: int | list[int] | None = None,
                 pad_token_id: int | None = None, logits_processor: LogitsProcessorList | None = None,
                 generator: torch.Generator | None = None, return_dict: bool = False
                 ) -> torch.Tensor | GenerationOutput:
        """Continue each prompt. Returns the prompt followed by the new tokens (OpenFlamingo's return), or
        a `GenerationOutput` with `return_dict=True`. Stops at `<|endofchunk|>` or EOS by default.

        With `prefix`, `lang_x` is only what follows it (the query), left-padded."""
        if lang_x is None:
            raise ValueError("lang_x is required")
        if max_new_tokens < 1 or num_beams < 1:
            raise ValueError("max_new_tokens and num_beams must be at least 1")
        if visual_tokens is None and vision_x is not None:
            visual_tokens = self.encode_vision(vision_x.to(self.device))   # once per item, never per beam
        lang_x = lang_x.to(self.device)
        attention_mask = torch.ones_like(lang_x) if attention_mask is None else attention_mask.to(self.device)
        stop = self._stop_ids(eos_token_id)
        pad = self.tokenizer.pad_token_id if pad_token_id is None else pad_token_id
        processors = generation.logits_processors(do_sample, temperature, top_k, top_p, logits_processor,
                                                  min_new_tokens, lang_x.shape[1], stop)
        state = generation.run_prompt(self, lang_x, attention_mask, visual_tokens, prefix)
        if num_beams > 1:
            if do_sample:
                raise ValueError("beam search with sampling is not supported; use num_beams=1 to sample")
            out = generation.decode_beam_search(self, state, lang_x, max_new_tokens, stop, pad, num_beams,
                                                length_penalty, processors)
        else:
            out = generation.decode_greedy_or_sample(self, state, lang_x, max_new_tokens, stop, pad,
                                                     do_sample, processors, generator)
        return out if return_dict else out.sequences

    @torch.inference_mode()
    def score(self, lang_x: torch.Tensor, candidates: list[list[int]], attention_mask: torch.Tensor | None = None,
              *, vision_x: torch.Tensor | None = None, visual_tokens: torch.Tensor | None = None,
              prefix: FewShotPrefix | None = None, length_normalize: bool = False) -> torch.Tensor:
        """Log-likelihood (B, K) of each candidate token sequence after each prompt (closed-ended tasks).
        The prompt runs once per item; all candidates continue from its cache in one batched pass."""
        if visual_tokens is None and vision_x is not None:
            visual_tokens = self.encode_vision(vision_x.to(self.device))
        lang_x = lang_x.to(self.device)
        attention_mask = torch.ones_like(lang_x) if attention_mask is None else attention_mask.to(self.device)
        state = generation.run_prompt(self, lang_x, attention_mask, visual_tokens, prefix)
        return generation.score_candidates(self, state, candidates, self.tokenizer.pad_token_id, length_normalize)

    # ------------------------------------------------------------------ text in, text out
    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded token ids and attention mask for a batch of prompts containing `<image>` markers."""
        enc = self.tokenizer(texts, padding="longest", return_tensors="pt", add_special_tokens=False)
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    def decode(self, tokens: torch.Tensor) -> list[str]:
        """Generated tokens -> text, cut at the first stop token."""
        stop = set(self._stop_ids(None).tolist())
        texts = []
        for row in tokens.tolist():
            cut = next((i for i, t in enumerate(row) if t in stop), len(row))
            texts.append(self.tokenizer.decode(row[:cut], skip_special_tokens=True).strip())
        return texts

    def _stop_ids(self, eos_token_id: int | list[int] | None) -> torch.Tensor:
        if eos_token_id is None:
            eos_token_id = [self.eoc_token_id] + ([self.tokenizer.eos_token_id]
                                                   if self.tokenizer.eos_token_id is not None else [])
        ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        return torch.tensor(ids, device=self.device)


def _patch_token_width(visual: nn.Module) -> int:
    """Width of the patch tokens an open_clip vision tower returns (before its projection)."""
    transformer = getattr(visual, "transformer", None)
    if isinstance(getattr(transformer, "width", None), int):
        return transformer.width
    ln_post = getattr(visual, "ln_post", None)
    if ln_post is not None:
        return ln_post.normalized_shape[0]
    raise ValueError(f"cannot tell the patch-token width of {type(visual).__name__}; pass vis_dim=")

