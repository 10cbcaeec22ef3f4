"""The decode loop (static cache, fixed-shape step, optionally compiled) against the plainest reference: the
whole model run on the whole sequence at every step, with no cache at all. Greedy tokens must be identical
and their log-probabilities equal; beam search and scoring must give the likelihoods the full forward gives;
with and without a few-shot prefix, for every LM family the tiny models cover."""

import logging

import pytest
import torch
from tiny_models import images, make_backbones, open_gates

from flamingo import Flamingo
from flamingo.decode_step import compile_decode_step

DEMOS = "<image>a red circle<|endofchunk|><image>a blue square<|endofchunk|>"
QUERIES = ["<image>a", "x <image>an object"]          # different lengths: the first row is left-padded
NEW = 6


def build(arch: str, **config_fields) -> Flamingo:
    model = Flamingo.from_backbones(*make_backbones(arch), cross_attn_every_n_layers=2, num_latents=8,
                                    resampler_depth=1, resampler_heads=2, resampler_dim_head=16, **config_fields)
    open_gates(model)
    return model


# Decoding keeps only the keys of the media each new token sees; a model whose tokens see every earlier media
# (only_attend_immediate_media=False) keeps them all: both must decode as the full forward does.
@pytest.fixture(scope="module", params=["gpt2", "llama", "gpt_neox", "mpt", "llama-all-media"])
def model(request):
    if request.param == "llama-all-media":
        return build("llama", only_attend_immediate_media=False)
    return build(request.param)


def inputs(model: Flamingo, with_demos: bool):
    """(prefix or None, query ids, query mask, query visual tokens, full ids, full mask, full visual tokens)."""
    ids, mask = model.tokenize(QUERIES)
    with torch.no_grad():
        visual = model.encode_vision(images(2, 1, seed=5))
        if not with_demos:
            return None, ids, mask, visual, ids, mask, visual
        prefix_ids, _ = model.tokenize([DEMOS])
        demo_visual = model.encode_vision(images(1, 2, seed=4))
    prefix = model.prepare_prefix(prefix_ids, visual_tokens=demo_visual)
    full_ids = torch.cat([prefix_ids.expand(2, -1), ids], 1)
    full_mask = torch.cat([torch.ones(2, prefix_ids.shape[1], dtype=mask.dtype), mask], 1)
    return prefix, ids, mask, visual, full_ids, full_mask, torch.cat([demo_visual.expand(2, -1, -1, -1), visual], 1)


@torch.no_grad()
def full_logprobs(model: Flamingo, ids, mask, visual) -> torch.Tensor:
    return model(lang_x=ids, attention_mask=mask, visual_tokens=visual).logits.float().log_softmax(-1)


def reference_greedy(model: Flamingo, ids, mask, visual, stop: list[int]):
    """Greedy decoding by re-running the whole sequence each step (stop tokens held off, as min_new_tokens)."""
    tokens, logprobs = [], []
    for _ in range(NEW):
        step = full_logprobs(model, ids, mask, visual)[:, -1]
        token = step.index_fill(1, torch.tensor(stop), -torch.inf).argmax(-1)
        tokens.append(token)
        logprobs.append(step.gather(1, token[:, None])[:, 0])
        ids, mask = torch.cat([ids, token[:, None]], 1), torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return torch.stack(tokens, 1), torch.stack(logprobs, 1).mean(1)


def likelihood(model: Flamingo, ids, mask, visual, new_tokens) -> torch.Tensor:
    """Mean log-probability of `new_tokens` (B, n) after each prompt, from one full forward."""
    full = torch.cat([ids, new_tokens], 1)
    logprobs = full_logprobs(model, full, torch.cat([mask, torch.ones_like(new_tokens)], 1), visual)
    n = new_tokens.shape[1]
    return logprobs[:, -n - 1:-1].gather(2, new_tokens[..., None])[..., 0].mean(1)


@pytest.mark.parametrize("with_demos", [False, True])
def test_decoding_equals_the_cacheless_full_forward(model, with_demos):
    prefix, ids, mask, visual, full_ids, full_mask, full_visual = inputs(model, with_demos)
    stop = model._stop_ids(None).tolist()

    greedy = model.generate(lang_x=ids, attention_mask=mask, visual_tokens=visual, prefix=prefix,
                            max_new_tokens=NEW, min_new_tokens=NEW, return_dict=True)
    tokens, mean_logprob = reference_greedy(model, full_ids, full_mask, full_visual, stop)
    assert greedy.new_tokens.tolist() == tokens.tolist()
    torch.testing.assert_close(greedy.mean_logprob, mean_logprob, atol=1e-4, rtol=0)

    # Beam search reorders the cache every step: its winners' likelihoods must be what the full forward says.
    beam = model.generate(lang_x=ids, attention_mask=mask, visual_tokens=visual, prefix=prefix,
                          max_new_tokens=NEW, min_new_tokens=NEW, num_beams=3, return_dict=True)
    assert beam.new_tokens.shape == (2, NEW)
    torch.testing.assert_close(beam.mean_logprob, likelihood(model, full_ids, full_mask, full_visual,
                                                             beam.new_tokens), atol=1e-4, rtol=0)
    assert bool((beam.mean_logprob >= greedy.mean_logprob - 1e-4).all())   # the greedy path was a candidate

    labels = [model.tokenizer.encode(t, add_special_tokens=False) for t in (" circle", " sq", " a triangle")]
    scores = model.score(ids, labels, mask, visual_tokens=visual, prefix=prefix)
    for k, label in enumerate(labels):
        expected = likelihood(model, full_ids, full_mask, full_visual, torch.tensor([label] * 2)) * len(label)
        torch.testing.assert_close(scores[:, k], expected, atol=1e-4, rtol=0)


def test_a_compile_that_fails_falls_back_to_eager_with_one_log_line(caplog):
    model = build("llama")
    prefix, ids, mask, visual, *_ = inputs(model, with_demos=True)

    def run():
        return model.generate(lang_x=ids, attention_mask=mask, visual_tokens=visual, prefix=prefix,
                              max_new_tokens=NEW, num_beams=2, return_dict=True)

    eager = run()

    def broken_backend(graph, example_inputs):
        raise RuntimeError("no C++ compiler here")

    with caplog.at_level(logging.WARNING, logger="flamingo.decode_step"):
        assert compile_decode_step(model.lm, backend=broken_backend)
        fallen_back = run()
        assert not compile_decode_step(model.lm, backend="no-such-backend")   # compile unavailable
        unavailable = run()
    assert model.lm.compiled_step is None
    lines = [r.getMessage() for r in caplog.records if r.name == "flamingo.decode_step"]
    assert len(lines) == 2 and not any("\n" in line for line in lines)
    assert "RuntimeError: no C++ compiler here" in lines[0] and "no-such-backend" in lines[1]
    for out in (fallen_back, unavailable):
        assert torch.equal(out.sequences, eager.sequences)
        torch.testing.assert_close(out.mean_logprob, eager.mean_logprob, atol=0, rtol=0)


@pytest.mark.slow   # inductor compiles the step for each batch shape: about a minute on 2 cores
def test_the_compiled_step_gives_the_eager_tokens():
    model = build("llama")
    prefix, ids, mask, visual, *_ = inputs(model, with_demos=True)

    def run(num_beams: int):
        return model.generate(lang_x=ids, attention_mask=mask, visual_tokens=visual, prefix=prefix,
                              max_new_tokens=NEW, num_beams=num_beams, return_dict=True)

    eager = [run(1), run(2)]
    assert model.compile_decoding()
    compiled = [run(1), run(2)]
    assert model.lm.compiled_step is not None   # it did not fall back
    for c, e in zip(compiled, eager):
        assert torch.equal(c.sequences, e.sequences)
        torch.testing.assert_close(c.mean_logprob, e.mean_logprob, atol=1e-5, rtol=0)


def test_the_prefix_media_is_carried_only_for_text_that_sees_it():
    """A query that starts with its image never attends to the prefix's last image (OpenFlamingo's rule), so its
    rows carry only their own media; text before a row's first image does see the prefix's, and keeps it."""
    from flamingo import generation

    model = build("llama")
    prefix, _, _, visual, *_ = inputs(model, with_demos=True)
    with torch.no_grad():
        for queries, media in ((["<image>a", "<image>an object"], 1), (["<image>a", "x <image>an object"], 2)):
            ids, mask = model.tokenize(queries)
            state = generation.run_prompt(model.lm, ids, mask, visual, prefix)
            assert state.cond.visual_tokens.shape[1] == media, queries
