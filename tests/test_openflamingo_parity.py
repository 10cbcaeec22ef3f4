"""Parity with the reference implementation: OpenFlamingo 2.0.1's own code, assembled by
flamingo_annotate/reference.py as the benchmark assembles it, with tiny random weights; its state dict is loaded
through our OpenFlamingo loader. Gates are opened first, or cross-attention would be a no-op."""

import pytest
import torch
from tiny_models import VIS_DIM, images, make_backbones, open_gates

from flamingo import Flamingo

pytest.importorskip("open_flamingo")
from flamingo_annotate.reference import build_reference  # noqa: E402  (needs OpenFlamingo)

LAYERS = {"llama": "model.layers", "gpt2": "transformer.h", "gpt_neox": "gpt_neox.layers",
          "mpt": "transformer.blocks"}


def build_pair(arch: str, every: int):
    clip, lm, tokenizer = make_backbones(arch)
    ref_clip, ref_lm, ref_tokenizer = make_backbones(arch)
    ref_tokenizer.add_special_tokens({"additional_special_tokens": ["<|endofchunk|>", "<image>"]})
    if ref_tokenizer.pad_token is None:
        ref_tokenizer.add_special_tokens({"pad_token": "<PAD>"})
    ref_lm.resize_token_embeddings(len(ref_tokenizer))
    reference = build_reference(ref_clip, ref_lm, eoc_token_id=ref_tokenizer.encode("<|endofchunk|>")[-1],
                                media_token_id=ref_tokenizer.encode("<image>")[-1], vis_dim=VIS_DIM,
                                cross_attn_every_n_layers=every, decoder_layers_attr_name=LAYERS[arch]).eval()
    torch.manual_seed(1)
    with torch.no_grad():  # random bridges, not the initial ones, so every parameter matters
        for name, p in reference.named_parameters():
            if name.startswith("perceiver.") or "gated_cross_attn_layers" in name:
                p.copy_(torch.randn_like(p) * 0.05 + (1.0 if name.endswith("norm.weight") else 0.0))
    open_gates(reference)

    model = Flamingo.from_backbones(clip, lm, tokenizer, cross_attn_every_n_layers=every)
    assert model.tokenizer.convert_tokens_to_ids(["<|endofchunk|>", "<image>"]) == \
        ref_tokenizer.convert_tokens_to_ids(["<|endofchunk|>", "<image>"])
    model.load_openflamingo_checkpoint(reference.state_dict())
    return model, reference, tokenizer


PROMPT = "<image>a red circle<|endofchunk|><image>a blue square<|endofchunk|><image>a"


# GPT-2 is covered by the gate-0 and masking tests only: its blocks take positional arguments, which
# OpenFlamingo's FlamingoLayer cannot pass on, so the reference itself cannot run it.
@pytest.mark.parametrize("arch,every", [("llama", 1), ("llama", 2), ("gpt_neox", 2), ("mpt", 1)])
def test_logits_match_reference(arch, every):
    model, reference, tokenizer = build_pair(arch, every)
    lang_x, mask = model.tokenize([PROMPT, "text first <image>then an image<|endofchunk|><image>b<image>"])
    vision_x = images(2, 3)
    with torch.no_grad():
        ours = model(vision_x=vision_x, lang_x=lang_x, attention_mask=mask).logits
        # The reference ignores the attention mask for positions: compare unpadded rows one by one.
        for row in range(2):
            keep = mask[row].bool()
            ref = reference(vision_x[row:row + 1], lang_x[row:row + 1, keep], mask[row:row + 1, keep]).logits
            solo = model(vision_x=vision_x[row:row + 1], lang_x=lang_x[row:row + 1, keep]).logits
            torch.testing.assert_close(solo, ref, atol=1e-4, rtol=0)
            torch.testing.assert_close(ours[row:row + 1, keep], ref, atol=1e-4, rtol=0)
    # The comparison is not vacuous: the images change the logits.
    with torch.no_grad():
        other = model(vision_x=images(2, 3, seed=5), lang_x=lang_x, attention_mask=mask).logits
    assert (other - ours).abs().max() > 1e-3


@pytest.mark.parametrize("arch,num_beams", [("llama", 1), ("gpt_neox", 1), ("llama", 3)])
def test_generation_matches_reference(arch, num_beams):
    """Greedy and beam search (the reference runs Hugging Face's generate()) give the same tokens."""
    model, reference, tokenizer = build_pair(arch, 1)
    lang_x, _ = model.tokenize([PROMPT])
    vision_x = images(1, 3)
    eoc = model.eoc_token_id
    ours = model.generate(vision_x=vision_x, lang_x=lang_x, max_new_tokens=10, num_beams=num_beams,
                          eos_token_id=eoc)
    with torch.no_grad():
        ref = reference.generate(vision_x, lang_x, torch.ones_like(lang_x), max_new_tokens=10,
                                 num_beams=num_beams, do_sample=False, eos_token_id=eoc,
                                 pad_token_id=tokenizer.pad_token_id)
    assert ours.tolist() == ref.tolist()


def test_trainable_only_checkpoint_loads_like_the_full_state_dict():
    """Released checkpoint.pt files hold the trained parameters only."""
    model, reference, _ = build_pair("llama", 2)
    state = {k: v for k, v in reference.state_dict().items()
             if k.startswith("perceiver.") or ".gated_cross_attn_layer." in k or k.endswith("embed_tokens.weight")}
    fresh = Flamingo.from_backbones(*make_backbones("llama"), cross_attn_every_n_layers=2)
    fresh.load_openflamingo_checkpoint(state)
    lang_x, _ = model.tokenize([PROMPT])
    with torch.no_grad():
        torch.testing.assert_close(fresh(vision_x=images(1, 3), lang_x=lang_x).logits,
                                   model(vision_x=images(1, 3), lang_x=lang_x).logits, atol=1e-5, rtol=0)
