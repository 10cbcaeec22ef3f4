"""The Flamingo model (Alayrac et al., 2022): a frozen open_clip vision encoder, a Perceiver Resampler and a
frozen Hugging Face causal LM with gated cross-attention blocks. The public surface follows OpenFlamingo
(`forward`, `generate`, `vision_x` shaped (B, T_media, F, C, H, W)); the faster paths (shared prefix, scoring)
sit beside it.

The route of the media, for one call:

    vision_x (B, T, F, 3, H, W)       pixels: T media per row, F frames each
      -> vision_encoder (frozen)      patch tokens (B*T*F, v, vis_dim)                        [vision.py]
      -> perceiver                    visual tokens (B, T, num_latents, vis_dim)              [resampler.py]
      -> lm.conditioning(lang_x, .)   MediaConditioning: those tokens + media_index (B, L),   [lm.py]
                                      the last <image> at or before each text token (-1: none)
      -> lm(...)                      puts it in the per-thread slot for exactly this call    [lm.py]
      -> each FlamingoLayer           gated block, reading the slot (image-causal mask: a     [gated_cross_attention.py]
                                      token attends only to the media of its media_index),
                                      then the frozen decoder layer
      -> logits (B, L, V)

Media are arguments of every call; nothing about a call is left on the model afterwards, so calls with
different media can be made in any order, or from several threads. Calling `lang_encoder` directly skips
this route, so its gated blocks raise. A fixed few-shot start of the prompt can be run once
(`prepare_prefix`) and continued by any number of queries (generation.py): exact, because under image-causal
masking the queries see the demonstrations' images only through their self-attention keys/values.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Literal, overload

import torch
from torch import nn
from transformers import LogitsProcessorList, PreTrainedModel, PreTrainedTokenizerBase
from transformers.modeling_outputs import CausalLMOutputWithPast

from . import checkpoint, generation
from .config import FlamingoConfig
from .decode_step import compile_decode_step
from .gated_cross_attention import GatedCrossAttentionBlock
from .generation import FewShotPrefix, GenerationOutput
from .lm import AddedRows, ConditionedLM, infer_decoder_layers_attr_name, input_embedding_weight, positions_from_mask
from .resampler import PerceiverResampler
from .tokens import add_flamingo_tokens
from .vision import FlamingoVision, encode_vision, patch_token_width, tower_image_size, tower_normalisation


class Flamingo(nn.Module):
    vision_encoder: nn.Module        # open_clip's vision tower
    perceiver: PerceiverResampler
    lang_encoder: PreTrainedModel    # the HF causal LM, with its decoder layers wrapped

    def __init__(self, vision_encoder: nn.Module, lang_encoder: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 config: FlamingoConfig):
        """Wrap the backbones as `config` says: an open_clip model (or its `.visual`), an HF causal LM and its
        tokenizer. Adds the Flamingo tokens (and embedding rows for them) where missing, and fills the fields
        the config leaves to the backbones (see `complete_config`). `flamingo.build` makes the backbones
        from a config; `flamingo.load_model` takes a name or a folder."""
        super().__init__()
        visual = getattr(vision_encoder, "visual", vision_encoder)
        new_tokens = add_flamingo_tokens(tokenizer)
        if len(tokenizer) > input_embedding_weight(lang_encoder).shape[0]:  # LMs often pad their vocab
            lang_encoder.resize_token_embeddings(len(tokenizer))
        self.config = config = complete_config(config, visual, lang_encoder, tokenizer, new_tokens)
        self.tokenizer = tokenizer
        vocab = tokenizer.get_vocab()
        missing = [t for t in (config.media_token, config.end_of_chunk_token) if t not in vocab]
        if missing:
            raise ValueError(f"the tokenizer lacks {missing}, the config's media / end-of-chunk tokens")
        self.media_token_id = vocab[config.media_token]
        self.eoc_token_id = vocab[config.end_of_chunk_token]

        visual.output_tokens = True  # open_clip: visual(x) -> (pooled, patch tokens)
        self.vision_encoder = visual
        assert config.vis_dim is not None  # complete_config filled it
        self.perceiver = new_perceiver(config, config.vis_dim)
        self.lm = ConditionedLM.wrap(lang_encoder, config, self.media_token_id)   # the LM's call path
        self.lang_encoder = lang_encoder                                            # its weights

        # Frozen backbones; trained: resampler, gated blocks, the added tokens' embedding rows.
        self.requires_grad_(False)
        self.perceiver.requires_grad_(True)
        for block in self.gated_cross_attn_layers():
            block.requires_grad_(True)
        for module in self.lang_encoder.modules():
            if isinstance(module, AddedRows):
                module.added_rows.requires_grad_(True)
        self.eval()

    # ------------------------------------------------------------------ construction and weights
    @classmethod
    def from_backbones(cls, vision_encoder: nn.Module, lang_encoder: PreTrainedModel,
                       tokenizer: PreTrainedTokenizerBase, cross_attn_every_n_layers: int = 1,
                       decoder_layers_attr_name: str | None = None, **config_fields) -> Flamingo:
        """OpenFlamingo-style, from already constructed backbones: the config is `config_fields` (bridge
        sizes etc.) with the pixel statistics the tower states; the rest is read from the backbones."""
        visual = getattr(vision_encoder, "visual", vision_encoder)
        config = FlamingoConfig(cross_attn_every_n_layers=cross_attn_every_n_layers,
                                decoder_layers_attr_name=decoder_layers_attr_name,
                                **{**tower_normalisation(visual), **config_fields})
        return cls(vision_encoder, lang_encoder, tokenizer, config)

    def save_pretrained(self, path: str | Path) -> None:
        """Config, weights (safetensors) and tokenizer in a folder that `flamingo.load_model` reads offline."""
        checkpoint.save_pretrained(self, path)

    def load_openflamingo_checkpoint(self, path_or_state_dict) -> None:
        """Load a released OpenFlamingo `checkpoint.pt` (a path, a hub id, or a state dict)."""
        checkpoint.load_openflamingo_checkpoint(self, path_or_state_dict)

    def gated_cross_attn_layers(self) -> list[GatedCrossAttentionBlock]:
        return self.lm.gated_cross_attn_layers()

    @property
    def shares_prefix_attention(self) -> bool:
        """Whether a shared prefix is read once per batch (prefix_attention) rather than copied per row."""
        return self.lm.shares_prefix_attention

    def parameter_counts(self) -> dict[str, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return {"trainable": trainable, "frozen": total - trainable, "total": total}

    def train(self, mode: bool = True) -> Flamingo:
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
        cond = self.lm.conditioning(lang_x, visual_tokens)
        past_len = 0
        if past_key_values is not None and past_key_values.get_seq_length() > 0:
            past_len = past_key_values.get_seq_length()
            if visual_tokens is not None and not bool((lang_x == self.media_token_id).any()):
                cond = cond.continued(torch.full_like(lang_x, visual_tokens.shape[1] - 1))
        full_mask = attention_mask
        if attention_mask.shape[1] == lang_x.shape[1] and past_len:
            full_mask = torch.cat([attention_mask.new_ones(lang_x.shape[0], past_len), attention_mask], 1)
        positions = positions_from_mask(full_mask)[:, -lang_x.shape[1]:]
        return self.lm(lang_x, full_mask, positions, cond, past_key_values, labels=labels, use_cache=use_cache)

    # ------------------------------------------------------------------ generation and scoring
    def compile_decoding(self, mode: str | None = None) -> bool:
        """Decode with a `torch.compile`d step from now on (decode_step.py); the first `generate` at each new
        batch size then pays the compile. mode: torch.compile's, by default "reduce-overhead" (CUDA graphs)
        on CUDA. Returns False, after one log line, where compile is unavailable; decoding is then eager."""
        if mode is None and self.device.type == "cuda":
            mode = "reduce-overhead"
        return compile_decode_step(self.lm, mode)

    @torch.inference_mode()
    def prepare_prefix(self, lang_x: torch.Tensor, vision_x: torch.Tensor | None = None,
                       visual_tokens: torch.Tensor | None = None) -> FewShotPrefix:
        """Compute a fixed few-shot prefix once (batch 1): its visual tokens and its KV cache."""
        if visual_tokens is None and vision_x is not None:
            visual_tokens = self.encode_vision(vision_x)
        return generation.prepare_prefix(self.lm, lang_x.to(self.device), visual_tokens)

    @overload
    def generate(self, vision_x: torch.Tensor | None = None, lang_x: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, *, visual_tokens: torch.Tensor | None = None,
                 prefix: FewShotPrefix | None = None, max_new_tokens: int = 20, min_new_tokens: int = 0,
                 num_beams: int = 1,
                 do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 length_penalty: float = 1.0, eos_token_id: int | list[int] | None = None,
                 pad_token_id: int | None = None, logits_processor: LogitsProcessorList | None = None,
                 generator: torch.Generator | None = None, return_dict: Literal[False] = False
                 ) -> torch.Tensor: ...

    @overload
    def generate(self, vision_x: torch.Tensor | None = None, lang_x: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, *, visual_tokens: torch.Tensor | None = None,
                 prefix: FewShotPrefix | None = None, max_new_tokens: int = 20, min_new_tokens: int = 0,
                 num_beams: int = 1,
                 do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 length_penalty: float = 1.0, eos_token_id: int | list[int] | None = None,
                 pad_token_id: int | None = None, logits_processor: LogitsProcessorList | None = None,
                 generator: torch.Generator | None = None, return_dict: Literal[True]
                 ) -> GenerationOutput: ...

    @overload
    def generate(self, vision_x: torch.Tensor | None = None, lang_x: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, *, visual_tokens: torch.Tensor | None = None,
                 prefix: FewShotPrefix | None = None, max_new_tokens: int = 20, min_new_tokens: int = 0,
                 num_beams: int = 1,
                 do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 length_penalty: float = 1.0, eos_token_id: int | list[int] | None = None,
                 pad_token_id: int | None = None, logits_processor: LogitsProcessorList | None = None,
                 generator: torch.Generator | None = None, return_dict: bool = False
                 ) -> torch.Tensor | GenerationOutput: ...

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
        state = generation.run_prompt(self.lm, lang_x, attention_mask, visual_tokens, prefix)
        if num_beams > 1:
            if do_sample:
                raise ValueError("beam search with sampling is not supported; use num_beams=1 to sample")
            out = generation.decode_beam_search(self.lm, state, lang_x, max_new_tokens, stop, pad, num_beams,
                                                length_penalty, processors)
        else:
            out = generation.decode_greedy_or_sample(self.lm, state, lang_x, max_new_tokens, stop, pad,
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
        state = generation.run_prompt(self.lm, lang_x, attention_mask, visual_tokens, prefix)
        return generation.score_candidates(self.lm, state, candidates, self.tokenizer.pad_token_id, length_normalize)

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
            text = self.tokenizer.decode(row[:cut], skip_special_tokens=True)
            assert isinstance(text, str)  # one sequence of ids decodes to one string
            texts.append(text.strip())
        return texts

    def _stop_ids(self, eos_token_id: int | list[int] | None) -> torch.Tensor:
        if eos_token_id is None:
            eos_token_id = [self.eoc_token_id] + ([self.tokenizer.eos_token_id]
                                                   if self.tokenizer.eos_token_id is not None else [])
        ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        return torch.tensor(ids, device=self.device)


def new_perceiver(config: FlamingoConfig, vis_dim: int) -> PerceiverResampler:
    """The resampler as the config sizes it (also made on the meta device to size a model before building)."""
    return PerceiverResampler(vis_dim, config.resampler_depth, config.resampler_dim_head, config.resampler_heads,
                              config.num_latents, config.max_num_frames, config.ff_mult)


def complete_config(config: FlamingoConfig, visual: nn.Module, lm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                    new_tokens: list[str]) -> FlamingoConfig:
    """The config with the fields it leaves open (None) read from the backbones: the tower's patch-token width
    and image size, where the LM keeps its decoder layers, and the ids of the tokens Flamingo added (with a
    tokenizer that had them all, the media and end-of-chunk tokens)."""
    image_size = tower_image_size(visual)
    if config.image_size is not None and config.image_size != image_size:
        raise ValueError(f"the config says image_size {config.image_size}, but the vision tower takes {image_size}")
    added = config.added_token_ids
    if added is None:
        ids = tokenizer.convert_tokens_to_ids(new_tokens or [config.end_of_chunk_token, config.media_token])
        assert isinstance(ids, list)  # a list of tokens converts to a list of ids
        added = ids
    return replace(
        config, image_size=image_size, added_token_ids=list(added),
        vis_dim=config.vis_dim if config.vis_dim is not None else patch_token_width(visual),
        decoder_layers_attr_name=config.decoder_layers_attr_name or infer_decoder_layers_attr_name(lm),
    )
