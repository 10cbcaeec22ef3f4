"""Stage 3 training: interleaved sequences, the bridge-only optimizer, exact resume, the YAML config, and
one Ray Train smoke run, all on the `tiny-random` model and the synthetic world."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

import flamingo
from training.bridges import BridgeTrainer, OptimSettings, latest_checkpoint
from training.config import ConfigError, DataConfig, TrainConfig, load_config
from training.sequences import IGNORE_INDEX, Episode, TrainingBatches, collate, encode_episode, make_labels
from training.train import METRICS_FILE, build, read_metrics, train_local

REPO = Path(__file__).resolve().parents[1]
SMALL_DATA = DataConfig(max_media=2, max_length=160, num_frames=4)


def small_config(tmp_path: Path, **overrides) -> TrainConfig:
    return replace(TrainConfig(model="tiny-random", checkpoint_dir=str(tmp_path / "checkpoints"),
                               output_dir=str(tmp_path / "model"), data=SMALL_DATA, steps=4, batch_size=2,
                               lr=1e-3, warmup_steps=1, checkpoint_every=2, log_every=1), **overrides)


@pytest.fixture(scope="module")
def model() -> flamingo.Flamingo:
    return flamingo.load_model("tiny-random")


# --- sequences -----------------------------------------------------------------------------------


def test_labels_mask_media_tokens_padding_and_text_before_the_first_image():
    media, pad = 7, 0
    lang_x = torch.tensor([[5, media, 1, 2, 9, media, 3, 9],
                           [media, 4, 9, pad, pad, pad, pad, pad]])
    mask = (torch.arange(8) < torch.tensor([[8], [3]])).long()
    labels = make_labels(lang_x, mask, media)
    assert labels.tolist() == [[-100, -100, 1, 2, 9, -100, 3, 9],
                               [-100, 4, 9, -100, -100, -100, -100, -100]]


def test_collated_batch_interleaves_media_and_text(model):
    data = TrainingBatches(model, SMALL_DATA, batch_size=3, seed=0)
    episodes = data.episodes(0)
    examples = [encode_episode(model, e, data.transform, SMALL_DATA.max_length) for e in episodes]
    batch = collate(examples, model.tokenizer.pad_token_id, model.media_token_id)
    lengths = [len(e.input_ids) for e in examples]
    assert batch.attention_mask.sum(1).tolist() == lengths
    for row, (episode, example) in enumerate(zip(episodes, examples)):
        ids = batch.lang_x[row]
        text = model.tokenizer.decode(example.input_ids)
        assert text.startswith("<image>") and text.endswith("<|endofchunk|>")
        # too long: whole trailing chunks are dropped with their media, never half a sentence
        assert int((ids == model.media_token_id).sum()) == example.vision_x.shape[0] <= len(episode.media)
        is_media = ids == model.media_token_id
        padding = batch.attention_mask[row] == 0
        assert bool((batch.labels[row][is_media | padding] == IGNORE_INDEX).all())
        text_positions = ~is_media & ~padding
        assert torch.equal(batch.labels[row][text_positions], ids[text_positions])  # <|endofchunk|> included
        assert bool((batch.vision_x[row, example.vision_x.shape[0]:] == 0).all())   # padded media
    assert batch.vision_x.shape[:2] == (3, max(e.vision_x.shape[0] for e in examples))
    assert batch.vision_x.shape[2:] == (1, 3, model.config.image_size, model.config.image_size)


def test_batches_are_a_function_of_seed_and_index_and_never_mix_frame_counts(model):
    data = TrainingBatches(model, replace(SMALL_DATA, video_fraction=0.5), batch_size=2, seed=3)
    first = data.batch(5)
    assert torch.equal(first.lang_x, data.batch(5).lang_x) and torch.equal(first.vision_x, data.batch(5).vision_x)
    frames = {data.batch(i).vision_x.shape[2] for i in range(8)}
    assert frames == {1, SMALL_DATA.num_frames}


def test_answer_loss_only_takes_the_loss_on_each_answer_and_nothing_before_it(model):
    questions = replace(SMALL_DATA, caption_weight=0.0, binding_weight=0.0, video_fraction=0.0)
    whole = TrainingBatches(model, questions, batch_size=3, seed=1).batch(0)
    answers = TrainingBatches(model, replace(questions, answer_loss_only=True), batch_size=3, seed=1).batch(0)
    assert torch.equal(whole.lang_x, answers.lang_x)                      # the same text, less of it scored
    scored = answers.labels != IGNORE_INDEX
    assert bool((whole.labels[scored] == answers.labels[scored]).all())
    for row in range(3):
        text = model.tokenizer.decode(answers.lang_x[row][answers.attention_mask[row] == 1])
        chunks = [c for c in text.split("<|endofchunk|>") if c]
        expected = "".join(" " + c.split(" Answer: ")[1] + "<|endofchunk|>" for c in chunks)
        assert model.tokenizer.decode(answers.labels[row][scored[row]]) == expected


def test_qa_attributes_and_min_objects_choose_the_questions_and_the_scenes(model):
    questions_only = replace(SMALL_DATA, caption_weight=0.0, binding_weight=0.0, video_fraction=0.0)

    def asked(**data) -> list[tuple[str, str]]:
        batches = TrainingBatches(model, replace(questions_only, **data), batch_size=4, seed=2)
        return [tuple(text.split(" Answer: ")) for i in range(10) for e in batches.episodes(i) for text in e.texts]

    colour = asked(qa_attributes=("colour",))
    assert colour and all(question.startswith("Question: What colour is") for question, _ in colour)
    assert {q.split()[1] for q, _ in asked()} > {"What", "Where", "How"}      # empty: every kind, as before
    existence = asked(qa_attributes=("existence",))
    assert {answer for _, answer in existence} == {"yes", "no"}
    assert all(question.startswith("Question: Is there a") for question, _ in existence)
    assert not any(question.startswith("Question: Is there a") for question, _ in asked())  # only when named

    def totals(**data) -> set[str]:
        return {answer for question, answer in asked(qa_attributes=("count",), **data)
                if question.endswith("How many shapes are there?")}
    assert "one" in totals()
    assert totals(min_objects=2) == {"two", "three"}
    with pytest.raises(ValueError, match=r"no question of \['relation'\] in 100 draws"):
        asked(qa_attributes=("relation",), max_objects=1)


def test_an_episode_given_part_must_lead_its_text():
    image = np.zeros((1, 8, 8, 3), np.uint8)
    Episode((image,), ("Question: Q? Answer: yes",), "qa", ("Question: Q? Answer:",))
    with pytest.raises(ValueError, match="leading part"):
        Episode((image,), ("Question: Q? Answer: yes",), "qa", ("Answer:",))


# --- the optimizer core --------------------------------------------------------------------------


def test_training_lowers_the_loss_and_changes_only_the_bridges(tmp_path):
    model = flamingo.load_model("tiny-random")   # its own copy: this test trains it
    config = small_config(tmp_path, steps=12, lr=3e-3)
    batch = TrainingBatches(model, config.data, config.batch_size, config.seed).batch(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    trainer = BridgeTrainer(model, OptimSettings.from_config(config))
    loss_before = trainer.eval_loss(batch)
    list(trainer.run(lambda index: batch, config.steps))
    loss_after = trainer.eval_loss(batch)
    assert loss_after < loss_before - 0.2, (loss_before, loss_after)

    after = model.state_dict()
    assert trainable and set(trainer.params) == trainable
    assert "lang_encoder.model.embed_tokens.added_rows" in trainable
    for name, value in after.items():
        if name in trainable:
            assert not torch.equal(value, before[name]), f"trainable {name} did not change"
        else:
            assert torch.equal(value, before[name]), f"frozen {name} changed"
    assert not model.vision_encoder.training and not model.lang_encoder.training  # backbones stay in eval


def test_gates_can_learn_faster_than_the_rest(model):
    trainer = BridgeTrainer(model, OptimSettings.from_config(replace(small_config(Path("unused")), gate_lr_scale=30)))
    gates = {id(gate) for b in model.gated_cross_attn_layers() for gate in (b.attn_gate, b.ff_gate)}
    by_lr = {}
    for group in trainer.optimizer.param_groups:
        by_lr.setdefault(group["initial_lr"], set()).update(id(p) for p in group["params"])
    assert by_lr[30 * 1e-3] == gates and not gates & by_lr[1e-3]
    assert sum(map(len, by_lr.values())) == len(trainer.params)


def test_reset_queries_redraws_the_query_projections_and_nothing_else(tmp_path):
    trained = flamingo.load_model("tiny-random")
    with torch.no_grad():   # a trained model's queries, much larger than a fresh layer draws them
        for block in trained.gated_cross_attn_layers():
            block.attn.to_q.weight.mul_(50)
    trained.save_pretrained(tmp_path / "trained")
    kept, _, _ = build(small_config(tmp_path, model=str(tmp_path / "trained")))
    reset, _, _ = build(small_config(tmp_path, model=str(tmp_path / "trained"), reset_queries=True))
    assert all(torch.equal(a, b) for a, b in zip(kept.state_dict().values(), trained.state_dict().values()))
    queries = {n for n in reset.state_dict() if n.endswith("attn.to_q.weight")}
    assert len(queries) == len(reset.gated_cross_attn_layers())
    for name, value in reset.state_dict().items():
        if name in queries:   # nn.Linear's own draw: uniform within 1 / sqrt(fan_in)
            assert not torch.equal(value, kept.state_dict()[name])
            assert float(value.abs().max()) <= value.shape[1] ** -0.5
        else:
            assert torch.equal(value, kept.state_dict()[name]), name


@pytest.mark.parametrize("reset_queries", [False, True])
def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path, reset_queries):
    # with reset_queries, a resumed run must keep its checkpoint's queries, not draw new ones
    straight = train_local(small_config(tmp_path / "straight", reset_queries=reset_queries))

    class Interrupted(Exception):
        pass

    def crash_after_step_3(metrics):
        if metrics["step"] == 3:
            raise Interrupted
    resumed_config = small_config(tmp_path / "resumed", reset_queries=reset_queries)
    with pytest.raises(Interrupted):
        train_local(resumed_config, on_step=crash_after_step_3)
    assert latest_checkpoint(resumed_config.checkpoint_dir).name == "step_00000002"
    resumed = train_local(resumed_config)

    assert [m["step"] for m in resumed.metrics] == [3, 4]
    assert [m["loss"] for m in resumed.metrics] == [m["loss"] for m in straight.metrics[2:]]
    assert read_metrics(Path(resumed_config.checkpoint_dir, METRICS_FILE)) == straight.metrics
    for name in ("trainable.safetensors", "optimizer.safetensors"):
        a = safetensors.torch.load_file(straight.checkpoint / name)
        b = safetensors.torch.load_file(resumed.checkpoint / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


# --- config --------------------------------------------------------------------------------------


RUN = "model: tiny-random\ncheckpoint_dir: c\noutput_dir: o\n"
REJECTED = [   # (the file, what its error must say after '<file>: ')
    (RUN + "data:\n  colour: red\n", r"data\.colour: unknown field"),
    (RUN + "stepz: 3\n", r"stepz: unknown field"),
    (RUN + "steps: many\n", r"steps: expected int"),
    (RUN + "data:\n  binding_categories: [shape, size]\n", r"data\.binding_categories: choose from"),
    (RUN + "data:\n  video_fraction: 2\n", r"data\.video_fraction: must be in"),
    (RUN + "data:\n  qa_attributes: [hue]\n", r"data\.qa_attributes: choose from"),
    (RUN + "data:\n  qa_attributes: [position]\n  video_fraction: 0.5\n",
     r"data\.qa_attributes: none of \['position'\] is asked about clips"),
    (RUN + "data:\n  min_objects: 4\n", r"data\.min_objects / data\.max_objects: need"),
    ("checkpoint_dir: c\noutput_dir: o\n", r"model: required"),
    (RUN + "data:\n  shards: s3://bucket/train\n", r"data\.shards: expected a list"),
]


@pytest.mark.parametrize("text, problem", REJECTED, ids=[problem.split(":")[0] for _, problem in REJECTED])
def test_config_rejects_unknown_and_mistyped_fields_naming_file_and_field(tmp_path, text, problem):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"{path}: {problem}"):
        load_config(path)


def test_config_reads_the_fields_it_is_given(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(RUN + "lr: 1e-4\ndata:\n  shards: [s3://bucket/train]\n")
    config = load_config(path)
    assert config.lr == 1e-4 and config.data.shards == ("s3://bucket/train",)


def test_bundled_tiny_config_loads():
    config = load_config(REPO / "jobs/train_configs/tiny.yaml")
    assert config.model == "tiny-random" and config.steps >= 100


# --- Ray Train -----------------------------------------------------------------------------------


def test_ray_train_smoke_run_checkpoints_and_saves_a_loadable_model(ray_session, tmp_path):
    from training.train import train

    config = small_config(tmp_path, steps=2, checkpoint_every=2, run_name="smoke")
    result = train(config)
    assert result.error is None
    assert result.checkpoint is not None
    with result.checkpoint.as_directory() as directory:
        saved = safetensors.torch.load_file(Path(directory, "trainable.safetensors"))
    assert result.metrics["step"] == 2

    model = flamingo.load_model(config.output_dir)
    params = dict(model.named_parameters())
    assert saved.keys() == {n for n, p in params.items() if p.requires_grad}
    assert all(torch.equal(params[name], value) for name, value in saved.items())


def test_train_command_trains_from_a_yaml_file(tmp_path):
    from click.testing import CliRunner

    from flamingo_annotate.cli import main

    path = tmp_path / "run.yaml"
    path.write_text(f"model: tiny-random\ncheckpoint_dir: {tmp_path / 'c'}\noutput_dir: {tmp_path / 'm'}\n"
                    "steps: 1\nbatch_size: 1\ndata:\n  max_media: 2\n  max_length: 96\n")
    result = CliRunner().invoke(main, ["train", str(path), "--local"])
    assert result.exit_code == 0, result.output
    assert flamingo.load_model(str(tmp_path / "m")).parameter_counts()["trainable"] > 0


def test_caption_episodes_come_from_shards_read_by_the_pipeline(model, tmp_path):
    from training.shards import make_shards
    from training.synthetic import make_scene

    make_shards(tmp_path / "shards", n_images=5, n_clips=2, seed=1, num_frames=4)
    config = replace(SMALL_DATA, shards=(str(tmp_path / "shards"),), qa_weight=0.0, binding_weight=0.0,
                     video_fraction=0.5)
    data = TrainingBatches(model, config, batch_size=2, seed=0)
    assert [len(data.shard_items[f]) for f in (1, 4)] == [5, 2]
    first = data.shard_items[1][0]
    assert first.texts[0] == make_scene((1, 0, 0)).caption()
    expected = data.transform(Image.fromarray(make_scene((1, 0, 0)).image()))
    assert torch.allclose(first.media[0][0].float(), expected, atol=1e-2)   # same pixels, stored as float16
    captions = {e.texts[0] for items in data.shard_items.values() for e in items}
    for index in range(4):
        for episode in data.episodes(index):
            assert set(episode.texts) <= captions
        batch = data.batch(index)
        assert batch.vision_x.shape[2] in (1, 4)
