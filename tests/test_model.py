"""Behaviour of the model library: a fresh model is its LM, image-causal masking, statelessness,
prefix reuse, scoring, padding, video, checkpoints."""

import threading

import pytest
import torch
from tiny_models import images, make_backbones, make_lm, open_gates

import flamingo
from flamingo import Flamingo

PROMPT = "<image>a red circle<|endofchunk|><image>a blue square<|endofchunk|><image>a"


@pytest.fixture(scope="module")
def model():
    return flamingo.load_model("tiny-random")  # gates open: images matter


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "mpt"])
def test_fresh_model_computes_exactly_the_base_lm(arch):
    clip, lm, tokenizer = make_backbones(arch)
    model = Flamingo.from_backbones(clip, lm, tokenizer, cross_attn_every_n_layers=2)
    base = make_lm(arch)
    base.resize_token_embeddings(len(tokenizer))
    base.get_input_embeddings().weight.data.copy_(model.lang_encoder.get_input_embeddings().weight)
    if base.get_output_embeddings() is not None:
        base.get_output_embeddings().weight.data.copy_(model.lang_encoder.get_output_embeddings().weight)
    lang_x, _ = model.tokenize([PROMPT])
    with torch.no_grad():
        ours = model(vision_x=images(1, 3), lang_x=lang_x).logits
        expected = base(input_ids=lang_x).logits
        generated = model.generate(vision_x=images(1, 3), lang_x=lang_x, max_new_tokens=5)
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0)
    assert generated.shape[1] > lang_x.shape[1]


def test_only_the_bridges_are_trainable(model):
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable, "nothing to train"
    for name in trainable:
        assert (name.startswith("perceiver.") or ".gated_cross_attn_layer." in name
                or name.endswith("added_rows")), name
    counts = model.parameter_counts()
    assert counts["trainable"] == sum(p.numel() for n, p in model.named_parameters() if n in trainable)
    assert counts["trainable"] + counts["frozen"] == counts["total"]
    assert not model.vision_encoder.training and not model.lang_encoder.training


def test_added_tokens_can_be_learned_in_and_out(model):
    """Both the input rows and the output rows of the added tokens are trained (a frozen output row would
    decide alone when the model emits <|endofchunk|>); nothing else of the LM gets a gradient."""
    lang_x, _ = model.tokenize(["<image>a red circle<|endofchunk|>"])
    labels = lang_x.clone()
    model.zero_grad(set_to_none=True)
    model(vision_x=images(1, 1), lang_x=lang_x, labels=labels).loss.backward()
    embedding, head = model.lang_encoder.get_input_embeddings(), model.lang_encoder.get_output_embeddings()
    assert embedding.added_rows.grad.abs().sum() > 0 and head.added_rows.grad.abs().sum() > 0
    assert embedding.weight.grad is None and head.weight.grad is None
    model.zero_grad(set_to_none=True)


def test_special_tokens_follow_openflamingo_order(model):
    ids = model.tokenizer.convert_tokens_to_ids(["<|endofchunk|>", "<image>", "<PAD>"])
    assert ids == sorted(ids) and ids[0] == 257 and model.tokenizer.pad_token_id == ids[2]


def test_text_sees_only_images_before_it(model):
    lang_x, _ = model.tokenize(["before <image>one<|endofchunk|><image>two<|endofchunk|><image>three"])
    positions = (lang_x[0] == model.media_token_id).nonzero().flatten().tolist()
    base = images(1, 3, seed=0)
    with torch.no_grad():
        reference = model(vision_x=base, lang_x=lang_x).logits
        for k, start in enumerate(positions):
            changed = base.clone()
            changed[:, k] = torch.randn_like(changed[:, k])
            logits = model(vision_x=changed, lang_x=lang_x).logits
            torch.testing.assert_close(logits[:, :start], reference[:, :start], atol=0, rtol=0)
            assert (logits[:, start:] - reference[:, start:]).abs().max() > 1e-4  # the image is seen


def test_each_token_cross_attends_to_the_last_image_only(model):
    """Which visual tokens each text token may attend to (later text still sees earlier text, and through it
    earlier images, by self-attention: that is the paper's design)."""
    lang_x, _ = model.tokenize(["before <image>one<|endofchunk|><image>two"])
    cond = model.lm.conditioning(lang_x, torch.zeros(1, 2, 8, 64))
    image_positions = (lang_x[0] == model.media_token_id).nonzero().flatten().tolist()
    expected = [-1] * image_positions[0] + [0] * (image_positions[1] - image_positions[0]) \
        + [1] * (lang_x.shape[1] - image_positions[1])
    assert cond.media_index[0].tolist() == expected


def test_calls_leave_no_state_behind(model):
    lang_x, _ = model.tokenize([PROMPT])
    a, b = images(1, 3, seed=1), images(1, 3, seed=2)
    with torch.no_grad():
        alone_a = model(vision_x=a, lang_x=lang_x).logits
        alone_b = model(vision_x=b, lang_x=lang_x).logits
        gen_a = model.generate(vision_x=a, lang_x=lang_x, max_new_tokens=6)
        again_b = model(vision_x=b, lang_x=lang_x).logits
        gen_b = model.generate(vision_x=b, lang_x=lang_x, max_new_tokens=6)
        again_a = model(vision_x=a, lang_x=lang_x).logits
    torch.testing.assert_close(again_a, alone_a, atol=0, rtol=0)
    torch.testing.assert_close(again_b, alone_b, atol=0, rtol=0)
    assert model.generate(vision_x=a, lang_x=lang_x, max_new_tokens=6).tolist() == gen_a.tolist()
    assert not torch.equal(alone_a, alone_b)
    assert model.lm.slot.current() is None
    # Concurrent calls from threads do not see each other's media.
    results = {}

    def run(name, media):
        results[name] = model.generate(vision_x=media, lang_x=lang_x, max_new_tokens=6)

    threads = [threading.Thread(target=run, args=(n, m)) for n, m in (("a", a), ("b", b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results["a"].tolist() == gen_a.tolist() and results["b"].tolist() == gen_b.tolist()


def test_calling_the_lang_encoder_directly_is_a_clear_error(model):
    """The gated blocks get their media from the Flamingo call: the bare LM has none to give them."""
    lang_x, _ = model.tokenize(["plain text"])
    with pytest.raises(RuntimeError, match="outside a Flamingo call.*not its lang_encoder directly"):
        model.lang_encoder(input_ids=lang_x)
    with torch.no_grad():
        text_only = model(lang_x=lang_x).logits       # the same text through the model: no media, no error
    assert torch.isfinite(text_only).all()


def test_left_padded_batch_equals_each_item_alone(model):
    texts = ["<image>a", "<image>a much longer prompt<|endofchunk|><image>with two images"]
    vision_x = images(2, 2, seed=3)
    lang_x, mask = model.tokenize(texts)
    batch = model.generate(vision_x=vision_x, lang_x=lang_x, attention_mask=mask, max_new_tokens=8,
                           return_dict=True)
    candidates = [[70, 71], [72]]
    batch_scores = model.score(lang_x, candidates, mask, vision_x=vision_x)
    for row, text in enumerate(texts):
        alone_ids, _ = model.tokenize([text])
        alone = model.generate(vision_x=vision_x[row:row + 1], lang_x=alone_ids, max_new_tokens=8,
                               return_dict=True)
        n = int(alone.num_new_tokens[0])
        assert batch.new_tokens[row, :n].tolist() == alone.new_tokens[0, :n].tolist()
        torch.testing.assert_close(batch.mean_logprob[row], alone.mean_logprob[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(batch_scores[row], model.score(alone_ids, candidates,
                                   vision_x=vision_x[row:row + 1])[0], atol=1e-5, rtol=0)


@pytest.fixture(scope="module", params=["llama", "gpt2", "mpt"])
def prefix_model(request):
    """Llama and GPT-2 read a shared prefix once for the batch (prefix_attention); MPT copies it per row."""
    model = Flamingo.from_backbones(*make_backbones(request.param), cross_attn_every_n_layers=2, num_latents=8,
                                    resampler_depth=2, resampler_heads=2, resampler_dim_head=16)
    open_gates(model)
    assert model.shares_prefix_attention == (request.param != "mpt")
    return model


@pytest.mark.parametrize("num_beams", [1, 3])
def test_shared_prefix_is_exact(prefix_model, num_beams):
    model = prefix_model
    demos = images(1, 2, seed=4)
    prefix_ids, _ = model.tokenize(["<image>a red circle<|endofchunk|><image>a blue square<|endofchunk|>"])
    prefix = model.prepare_prefix(prefix_ids, vision_x=demos)
    queries = ["<image>a", "<image>an object that"]
    query_ids, query_mask = model.tokenize(queries)
    query_media = images(2, 1, seed=5)
    fast = model.generate(vision_x=query_media, lang_x=query_ids, attention_mask=query_mask, prefix=prefix,
                          max_new_tokens=10, num_beams=num_beams, return_dict=True)
    for row, query in enumerate(queries):
        full_ids, _ = model.tokenize([model.tokenizer.decode(prefix_ids[0]) + query])
        full_media = torch.cat([demos, query_media[row:row + 1]], 1)
        slow = model.generate(vision_x=full_media, lang_x=full_ids, max_new_tokens=10, num_beams=num_beams,
                              return_dict=True)
        n = int(slow.num_new_tokens[0])
        assert int(fast.num_new_tokens[row]) == n
        assert fast.new_tokens[row, :n].tolist() == slow.new_tokens[0, :n].tolist()


def test_scoring_with_prefix_equals_full_prompt_likelihood(prefix_model):
    model = prefix_model
    demos = images(1, 2, seed=6)
    prefix_ids, _ = model.tokenize(["<image>shape: circle<|endofchunk|><image>shape: square<|endofchunk|>"])
    prefix = model.prepare_prefix(prefix_ids, vision_x=demos)
    query_ids, _ = model.tokenize(["<image>shape:"])
    query_media = images(1, 1, seed=7)
    labels = [model.tokenizer.encode(t, add_special_tokens=False) for t in (" circle", " square", " triangle")]
    fast = model.score(query_ids, labels, vision_x=query_media, prefix=prefix)
    normalised = model.score(query_ids, labels, vision_x=query_media, prefix=prefix, length_normalize=True)
    full_media = torch.cat([demos, query_media], 1)
    for k, label in enumerate(labels):
        ids = torch.cat([prefix_ids, query_ids, torch.tensor([label])], 1)
        with torch.no_grad():
            logprobs = model(vision_x=full_media, lang_x=ids).logits.log_softmax(-1)
        start = ids.shape[1] - len(label)
        expected = sum(logprobs[0, start + j - 1, t] for j, t in enumerate(label))
        torch.testing.assert_close(fast[0, k], expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(normalised[0, k], expected / len(label), atol=1e-5, rtol=0)


def test_video_clips_use_time_embeddings(model):
    lang_x, _ = model.tokenize(["<image>a clip of"])
    clip = images(1, 1, frames=4, seed=8)
    reversed_clip = clip.flip(2)
    with torch.no_grad():
        model.perceiver.frame_embs.normal_()
        forward = model(vision_x=clip, lang_x=lang_x).logits
        backward = model(vision_x=reversed_clip, lang_x=lang_x).logits
        model.perceiver.frame_embs.zero_()
    assert (forward - backward).abs().max() > 1e-4  # frame order matters
    out = model.generate(vision_x=clip, lang_x=lang_x, max_new_tokens=4)
    assert out.shape[1] > lang_x.shape[1]
    with pytest.raises(ValueError, match="max_num_frames"):
        model.encode_vision(images(1, 1, frames=9))


def test_more_image_tokens_than_media_is_a_clear_error(model):
    lang_x, _ = model.tokenize(["<image>one<image>two"])
    with pytest.raises(ValueError, match="only 1 media"):
        model(vision_x=images(1, 1), lang_x=lang_x)


def test_sampling_is_reproducible_with_a_generator(model):
    lang_x, _ = model.tokenize([PROMPT])
    kwargs = dict(vision_x=images(1, 3), lang_x=lang_x, max_new_tokens=8, do_sample=True, temperature=0.9,
                  top_k=20, top_p=0.9)
    first = model.generate(**kwargs, generator=torch.Generator().manual_seed(0))
    second = model.generate(**kwargs, generator=torch.Generator().manual_seed(0))
    assert first.tolist() == second.tolist()


def test_min_new_tokens_holds_off_the_stop_tokens(model):
    lang_x, _ = model.tokenize([PROMPT])
    first = int(model.generate(vision_x=images(1, 3), lang_x=lang_x, max_new_tokens=1)[0, -1])
    stopped = model.generate(vision_x=images(1, 3), lang_x=lang_x, max_new_tokens=6, eos_token_id=first,
                             return_dict=True)
    assert stopped.num_new_tokens.tolist() == [1]
    held = model.generate(vision_x=images(1, 3), lang_x=lang_x, max_new_tokens=6, min_new_tokens=4,
                          eos_token_id=first, return_dict=True)
    assert int(held.num_new_tokens[0]) >= 4 and first not in held.new_tokens[0, :3].tolist()


def test_incremental_forward_with_past_key_values_matches_the_full_forward(model):
    """OpenFlamingo-style decoding by hand: later tokens without <image> see the last media."""
    lang_x, _ = model.tokenize([PROMPT + " red circle"])
    vision_x = images(1, 3)
    with torch.no_grad():
        full = model(vision_x=vision_x, lang_x=lang_x).logits
        first = model(vision_x=vision_x, lang_x=lang_x[:, :-2], use_cache=True)
        rest = model(vision_x=vision_x, lang_x=lang_x[:, -2:], past_key_values=first.past_key_values)
    torch.testing.assert_close(rest.logits, full[:, -2:], atol=1e-5, rtol=0)
