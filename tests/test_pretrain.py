"""Stages 1 and 2 (contrastive vision pretraining, text-only LM pretraining) and the miniature Flamingo
built from them, on backbones small enough to train a few steps in a second."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from open_clip.loss import ClipLoss
from open_clip.pos_embed import get_2d_sincos_pos_embed
from open_clip.tokenizer import SimpleTokenizer

import flamingo
from flamingo.tokens import END_OF_CHUNK_TOKEN, MEDIA_TOKEN
from training.miniature import build_miniature
from training.pretrain_lm import (
    ANSWERED_ATTRIBUTES,
    DOCUMENT_KINDS,
    END_OF_TEXT,
    IGNORE_INDEX,
    DocumentMix,
    LMPretrainConfig,
    answered_accuracy,
    answered_question,
    binding_accuracy,
    build_lm,
    documents,
    encode_batch,
    held_out_texts,
    load_lm,
    named_binding,
    perplexity,
    pretrain_lm,
    repeated_strings,
    repeated_words,
    save_lm,
    train_tokenizer,
)
from training.pretrain_vision import (
    EVAL_STREAM,
    MAP_VALUES,
    VisionPretrainConfig,
    build_clip,
    contrastive_step,
    load_vision,
    object_map,
    pixels,
    pretrain_vision,
    retrieval_accuracy,
    sample_batch,
    sample_pairs,
    save_vision,
)
from training.synthetic import BACKGROUND, COLOURS, GRID, SHAPES, SIZES, SceneObject

VISION = VisionPretrainConfig(steps=2, batch_size=8, warmup_steps=1, image_size=32, patch_size=8, width=32, layers=1,
                              head_width=16, embed_dim=16, text_width=32, text_layers=1, text_heads=2)
LM = LMPretrainConfig(steps=2, batch_size=8, warmup_steps=1, vocab_size=320, tokenizer_documents=300, max_length=64,
                      hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=128)


def _adamw(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=lr)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(documents(LM, 0, LM.tokenizer_documents, stream=2), LM.vocab_size)


# --- stage 1: vision ------------------------------------------------------------------------------


def test_pairs_are_seeded_and_held_out_scenes_differ():
    images, captions = sample_pairs(VISION, 3)
    again_images, again_captions = sample_pairs(VISION, 3)
    assert captions == again_captions and all((a == b).all() for a, b in zip(images, again_images))
    assert sample_pairs(VISION, 3, stream=EVAL_STREAM)[1] != captions
    assert images[0].shape == (32, 32, 3) and all(c.endswith(".") for c in captions)
    assert pixels(images).shape == (8, 3, 32, 32)


def test_contrastive_steps_lower_the_loss():
    model = build_clip(VISION)
    images, captions = sample_pairs(VISION, 0)
    optimizer, tokenizer = _adamw(model, 3e-3), SimpleTokenizer(context_length=VISION.context_length)
    losses = [contrastive_step(model, optimizer, ClipLoss(), tokenizer, images, captions, 1.0) for _ in range(6)]
    assert losses[-1] < losses[0] - 0.1, losses


def test_retrieval_accuracy_is_a_fraction_near_chance_for_a_random_tower():
    accuracy = retrieval_accuracy(build_clip(VISION), VISION, groups=2, group_size=8)
    assert 0.0 <= accuracy <= 0.5        # chance is 1/8 (plus ties between identical captions)
    assert retrieval_accuracy(build_clip(VISION), VISION, groups=2, group_size=8) == accuracy   # deterministic


def test_pretrain_vision_is_seeded_and_saves_as_safetensors(tmp_path: Path):
    first, second = pretrain_vision(VISION), pretrain_vision(VISION)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name
    assert not torch.equal(first.visual.conv1.weight, build_clip(VISION).visual.conv1.weight)
    save_vision(first, VISION, tmp_path / "vision")
    loaded, config = load_vision(tmp_path / "vision")
    assert config["vision_cfg"]["width"] == VISION.width and not list((tmp_path / "vision").glob("*.pt"))
    x = pixels(sample_pairs(VISION, 0)[0])
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(x), first.encode_image(x))


def test_a_fixed_position_embedding_survives_training_and_saving(tmp_path: Path):
    # sin_cos_2d exists so that training cannot erase position: the table must stay as built, through
    # training steps and a save / load, while the rest of the tower learns.
    config = replace(VISION, pos_embed_type="sin_cos_2d")
    grid = config.image_size // config.patch_size
    table = torch.from_numpy(get_2d_sincos_pos_embed(config.width, grid, cls_token=True)).float()
    trained = pretrain_vision(config)
    assert torch.equal(trained.visual.positional_embedding, table)
    assert not torch.equal(trained.visual.conv1.weight, build_clip(config).visual.conv1.weight)
    save_vision(trained, config, tmp_path / "vision")
    loaded, saved = load_vision(tmp_path / "vision")
    assert saved["vision_cfg"]["pos_embed_type"] == "sin_cos_2d"
    assert torch.equal(loaded.visual.positional_embedding, table)
    with pytest.raises(ValueError, match="pos_embed_type"):
        VisionPretrainConfig(pos_embed_type="rope")


def test_the_object_map_covers_every_drawn_pixel_with_its_objects_attributes():
    # The map is the target of the patch tokens: a patch with any of an object's pixels must name that
    # object's shape, colour, size and cell, and a patch no object reaches must say none.
    config = VisionPretrainConfig(image_size=64, max_objects=1, batch_size=32)
    batch = sample_batch(config, 0)
    labels = object_map(batch.footprints, 64, 8).view(-1, 8, 8, len(MAP_VALUES))
    for image, footprint, label in zip(batch.images, batch.footprints, labels):
        drawn = torch.from_numpy((image != BACKGROUND).any(-1))                  # (64, 64) object pixels
        touched = drawn.view(8, 8, 8, 8).any(-1).any(1)                         # (8, 8) patches with any
        named = {(1 + SHAPES.index(f.thing.shape), 1 + list(COLOURS).index(f.thing.colour),
                  1 + list(SIZES).index(f.thing.size)) for f in footprint}
        for column in range(len(MAP_VALUES)):
            assert touched.any() and torch.equal(label[..., column] > 0, touched)
        assert {tuple(row[:3]) for row in label[touched].tolist()} <= named
        if len(footprint) == 1:
            assert {tuple(row[:3]) for row in label[touched].tolist()} == named
            if isinstance(footprint[0].thing, SceneObject):   # a still: the object lies inside its cell
                thing = footprint[0].thing
                assert set(label[touched][:, 3].tolist()) == {1 + thing.row * GRID + thing.col}
    only_shape = object_map(batch.footprints, 64, 8, ("shape",))
    assert torch.equal(only_shape[..., 0], labels.flatten(1, 2)[..., 0])


def test_the_object_map_loss_is_seeded_and_changes_what_the_tower_learns():
    config = replace(VISION, object_map_weight=1.0)
    first, second, plain = pretrain_vision(config), pretrain_vision(config), pretrain_vision(VISION)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name
    assert not torch.equal(first.visual.conv1.weight, plain.visual.conv1.weight)
    with pytest.raises(ValueError, match="object_map_weight"):
        VisionPretrainConfig(object_map_weight=-1.0)
    for wrong in ((), ("shape", "shape"), ("shape", "texture")):
        with pytest.raises(ValueError, match="object_map_attributes"):
            VisionPretrainConfig(object_map_attributes=wrong)


def test_a_conv_stem_tower_saves_loads_and_joins_a_flamingo(tokenizer, tmp_path: Path):
    # The stem lives in the tower's config: saved with it, rebuilt from it by load_vision and by the
    # Flamingo that records it, with the same patch-token grid as the ViT's own projection.
    config = replace(VISION, conv_stem=((8, 3, 1), (16, 3, 2), (32, 3, 4)))
    trained = pretrain_vision(config)
    save_vision(trained, config, tmp_path / "vision")
    loaded, saved = load_vision(tmp_path / "vision")
    assert saved["conv_stem"] == [[8, 3, 1], [16, 3, 2], [32, 3, 4]]
    x = pixels(sample_pairs(config, 0)[0])
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(x), trained.encode_image(x))
    save_lm(build_lm(LM, tokenizer), tokenizer, tmp_path / "lm")
    model = flamingo.load_model(str(build_miniature(tmp_path / "vision", tmp_path / "lm", tmp_path / "miniature")))
    with torch.no_grad():
        tokens = model.vision_encoder(x)[1]
        assert tokens.shape == (len(x), (config.image_size // config.patch_size) ** 2, config.width)
        trained.visual.output_tokens = True
        assert torch.equal(tokens, trained.visual(x)[1])


# --- stage 2: language ----------------------------------------------------------------------------


def test_tokenizer_round_trips_world_text_and_unseen_words(tokenizer):
    for text in [*held_out_texts(LM, 8), "This is a zibbotrax.", "Question: What colour? Answer: ünïcode"]:
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    eos = tokenizer.convert_tokens_to_ids(END_OF_TEXT)
    assert tokenizer.eos_token == END_OF_TEXT and tokenizer(END_OF_TEXT)["input_ids"] == [eos]
    text = "a large red circle at the top left."
    assert len(tokenizer(text)["input_ids"]) < len(text) / 2                        # merges were learnt


def test_batches_end_documents_and_ignore_only_padding(tokenizer):
    batch = encode_batch(tokenizer, ["a red circle.", "Question: How many shapes are there? Answer: two"], 64)
    lengths = batch["attention_mask"].sum(1)
    for row, length in enumerate(lengths.tolist()):
        assert batch["input_ids"][row, length - 1] == tokenizer.eos_token_id
        assert (batch["labels"][row, :length] != IGNORE_INDEX).all()
        assert (batch["labels"][row, length:] == IGNORE_INDEX).all()


def test_lm_steps_lower_the_loss_and_perplexity(tokenizer):
    lm = build_lm(LM, tokenizer)
    texts = held_out_texts(LM, 16)
    before = perplexity(lm, tokenizer, texts)
    assert len(tokenizer) / 3 < before < len(tokenizer) * 3        # random: about the vocabulary size
    batch = encode_batch(tokenizer, documents(LM, 0, 16), LM.max_length)
    optimizer = _adamw(lm, 3e-3)
    losses = []
    for _ in range(6):
        loss = lm(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses
    assert 1 < perplexity(lm, tokenizer, texts) < before


def test_pretrain_lm_is_seeded_and_saves_with_save_pretrained(tokenizer, tmp_path: Path):
    (first, _), (second, _) = pretrain_lm(LM, tokenizer=tokenizer), pretrain_lm(LM, tokenizer=tokenizer)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name
    save_lm(first, tokenizer, tmp_path / "lm")
    assert (tmp_path / "lm" / "model.safetensors").is_file() and (tmp_path / "lm" / "tokenizer.json").is_file()
    loaded, loaded_tokenizer = load_lm(tmp_path / "lm")
    texts = held_out_texts(LM, 8)
    assert perplexity(loaded, loaded_tokenizer, texts) == pytest.approx(perplexity(first, tokenizer, texts))


def test_named_binding_answers_follow_from_the_object_named_before_them():
    import re

    import numpy as np
    rng = np.random.default_rng(0)
    for _ in range(50):
        sentences = re.findall(r"This is a (\w+) (\w+) (\w+)\.", named_binding(rng))
        *support, (colour, shape, answer) = sentences
        same_shape = {word for c, s, word in support if s == shape}
        same_object = {word for c, s, word in support if (c, s) == (colour, shape)}
        assert answer in same_shape and len({w for _, _, w in support}) >= 2
        assert same_object <= {answer}   # words name shapes or colour + shape pairs, never both ways
    lengths = {named_binding(rng, max_shots=6).count(".") for _ in range(200)}
    assert max(lengths) > 10 and max(lengths) <= 3 * 6 + 1   # up to 3 words x 6 shots, and the query


def test_repeated_words_say_the_same_run_twice():
    import numpy as np
    rng = np.random.default_rng(0)
    for _ in range(20):
        first, second = repeated_words(rng).removesuffix(".").split(". ")
        assert first == second and 4 <= len(first.split()) <= 12


def test_answered_questions_follow_from_the_caption_before_them():
    import re

    import numpy as np
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(300):
        document = re.fullmatch(r"(.+\.) Question: (.+\?) Answer: (.+)", answered_question(rng))
        assert document is not None
        caption, question, answer = document.groups()
        colour = re.fullmatch(r"What colour is the (\w+)\?", question)
        shape = re.fullmatch(r"What shape is the (\w+) object\?", question)
        if colour:
            assert f"{answer} {colour.group(1)}" in caption
        elif shape:
            assert f"{shape.group(1)} {answer}" in caption
        elif question == "How many shapes are there?":
            assert answer == ["one", "two", "three"][caption.count(", a ") + caption.count(" and a ")]
        else:
            continue
        checked += 1
    assert checked > 100


def test_repeated_strings_say_a_run_of_any_letters_twice():
    import string

    import numpy as np
    rng = np.random.default_rng(0)
    letters = set()
    for _ in range(50):
        first, second = repeated_strings(rng).removesuffix(".").split(". ")
        assert first == second and 4 <= len(first.split()) <= 12
        assert all(1 <= len(word) <= 10 for word in first.split())
        letters |= set(first.replace(" ", ""))
    assert letters == set(string.ascii_lowercase)       # every letter, not only the nonsense words'


def test_the_default_mix_draws_no_answered_questions_and_no_strings():
    # the bundled model's stage 2 drew without them: a default recipe must draw the same documents, which it
    # does because zero-weight kinds come last (numpy's choice then maps every draw to the same kind)
    assert DocumentMix().answered == 0.0 and DocumentMix().strings == 0.0
    assert DOCUMENT_KINDS[-2:] == ("answered", "strings")


def test_document_mix_weights_choose_the_kinds():
    import dataclasses
    only_repeats = dataclasses.replace(LM, documents=DocumentMix(**{kind: 0.0 for kind in ("caption", "qa", "captions",
                                                                                          "binding", "named_binding")}))
    for text in documents(only_repeats, 0, 10):
        first, second = text.removesuffix(".").split(". ")
        assert first == second
    with pytest.raises(ValueError, match="repeat: must be non-negative"):
        DocumentMix(repeat=-1.0)
    with pytest.raises(ValueError, match="must not all be 0"):
        DocumentMix(**{kind: 0.0 for kind in DOCUMENT_KINDS})


def test_binding_accuracy_of_an_untrained_lm_is_near_chance(tokenizer):
    accuracy = binding_accuracy(build_lm(LM, tokenizer), tokenizer, LM, episodes=60)
    assert 0.2 <= accuracy <= 0.7   # chance is about 0.42 over 2..3 words


def test_binding_accuracy_scores_wide_words_on_the_same_episodes(tokenizer):
    import re

    from training.evaluate import is_training_word

    class Recording:
        """The tokenizer, noting every text it encodes."""
        def __init__(self):
            self.texts = []

        def __call__(self, text, **kwargs):
            self.texts.append(text)
            return tokenizer(text, **kwargs)

    lm = build_lm(LM, tokenizer)
    scored = {}
    for words in ("train", "wide"):
        recording = Recording()
        binding_accuracy(lm, recording, LM, episodes=5, words=words)
        scored[words] = recording.texts
    candidates = {words: [re.fullmatch(r" (\w+)\.", t).group(1) for t in texts if re.fullmatch(r" \w+\.", t)]
                  for words, texts in scored.items()}
    assert candidates["train"] and all(is_training_word(w) for w in candidates["train"])
    assert len(candidates["wide"]) == len(candidates["train"])      # the same episodes, each word renamed
    assert not any(is_training_word(w) for w in candidates["wide"])
    with pytest.raises(ValueError, match="words: must be train or wide"):
        binding_accuracy(lm, tokenizer, LM, episodes=1, words="other")


def test_answered_accuracy_scores_the_greedy_answer_per_attribute(tokenizer):
    """An untrained LM answers nothing; an LM that always says 'red' then ends is right only on colour
    questions, about as often as a colour question's answer is red (one colour in 5)."""
    untrained = answered_accuracy(build_lm(LM, tokenizer), tokenizer, LM, questions=40)
    assert set(untrained) == {*ANSWERED_ATTRIBUTES, "all"} and untrained["all"] <= 0.1

    class SaysRed:
        def eval(self):
            return self

        def generate(self, ids, **_):
            red = tokenizer(" red<|endoftext|> blue", add_special_tokens=False, return_tensors="pt")["input_ids"]
            return torch.cat([ids, red], 1)

    scores = answered_accuracy(SaysRed(), tokenizer, LM, questions=400)
    assert 0.08 <= scores["colour"] <= 0.4, scores
    assert scores["shape"] == scores["size"] == scores["position"] == 0.0, scores
    assert 0 < scores["all"] < scores["colour"]


# --- the miniature --------------------------------------------------------------------------------


def test_build_miniature_loads_with_flamingo_tokens(tokenizer, tmp_path: Path):
    clip = build_clip(VISION)
    save_vision(clip, VISION, tmp_path / "vision")
    save_lm(build_lm(LM, tokenizer), tokenizer, tmp_path / "lm")
    out = build_miniature(tmp_path / "vision", tmp_path / "lm", tmp_path / "miniature")
    model = flamingo.load_model(str(out))
    vocab = model.tokenizer.get_vocab()
    assert {MEDIA_TOKEN, END_OF_CHUNK_TOKEN, END_OF_TEXT} <= set(vocab) and model.tokenizer.pad_token is not None
    assert model.config.image_size == VISION.image_size and model.config.vis_dim == VISION.width
    assert torch.equal(model.vision_encoder.conv1.weight, clip.visual.conv1.weight)   # the pretrained tower
    lang_x, attention_mask = model.tokenize([f"{MEDIA_TOKEN}a red circle.{END_OF_CHUNK_TOKEN}"])
    vision_x = pixels(sample_pairs(VISION, 0, count=1)[0])[None, None]                 # (B, T, F, C, H, W)
    with torch.no_grad():
        logits = model(vision_x=vision_x, lang_x=lang_x, attention_mask=attention_mask).logits
    assert logits.shape[:2] == lang_x.shape and torch.isfinite(logits).all()


def test_hard_negatives_vary_only_the_attributes_configured() -> None:
    config = VisionPretrainConfig(max_objects=1, clip_fraction=0.0, group_size=4, batch_size=8,
                                  variant_attributes=("shape",))
    _, captions = sample_pairs(config, 0)
    for group in (captions[:4], captions[4:]):
        words = [c.split() for c in group]
        differing = {i for w in words[1:] for i, (a, b) in enumerate(zip(words[0], w)) if a != b}
        assert len(differing) == 1   # the shape word, and nothing else, changes within a group
    with pytest.raises(ValueError, match="variant_attributes: one or more of"):
        VisionPretrainConfig(variant_attributes=("texture",))
