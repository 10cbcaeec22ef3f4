"""The recipe command: all three stages, the join and the evaluation from one YAML file, on backbones small
enough to run a few steps of each in seconds; a second run skips what is done."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

import flamingo
from flamingo.presets import BUNDLED_DIR
from flamingo_annotate.cli import main
from training.config import ConfigError
from training.pretrain_lm import ANSWERED_ATTRIBUTES
from training.pretrain_vision import clip_config
from training.recipe import RECIPE_FILE, load_recipe, run_recipe

REPO = Path(__file__).resolve().parents[1]
SMALL = {
    "vision": {"steps": 2, "batch_size": 8, "warmup_steps": 1, "image_size": 32, "patch_size": 8, "width": 32,
               "layers": 1, "head_width": 16, "embed_dim": 16, "text_width": 32, "text_layers": 1, "text_heads": 2},
    "lm": {"steps": 2, "batch_size": 8, "warmup_steps": 1, "vocab_size": 320, "tokenizer_documents": 300,
           "max_length": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
           "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 512},
    "bridges": {"num_latents": 4, "resampler_depth": 1, "resampler_heads": 2, "resampler_dim_head": 8,
                "xattn_heads": 2, "xattn_dim_head": 8, "ff_mult": 1, "max_num_frames": 4},
    "stage3": [{"data": {"image_size": 32, "max_objects": 1, "qa_weight": 0, "binding_weight": 0, "video_fraction": 0},
                "steps": 2, "batch_size": 2, "warmup_steps": 1, "checkpoint_every": 2, "log_every": 1},
               {"data": {"image_size": 32, "max_media": 2, "max_length": 160, "num_frames": 4, "binding_shots": 2},
                "steps": 3, "batch_size": 2, "warmup_steps": 1, "checkpoint_every": 3, "log_every": 1}],
    "eval": {"scenes": 2, "clips": 1, "episodes": 2, "questions": 2, "task_items": 3, "shots": [0, 1],
             "image_size": 32, "max_new_tokens": 4},
}


def write_recipe(tmp_path: Path, **changes) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"out_dir": str(tmp_path / "out"), **SMALL, **changes}))
    return path


@pytest.mark.slow   # all three stages and the evaluation, about a minute
def test_recipe_runs_every_stage_then_skips_them(tmp_path: Path, capsys):
    config = load_recipe(write_recipe(tmp_path))
    model_dir = run_recipe(config, local=True, log_every=0)
    record = json.loads((tmp_path / "out" / RECIPE_FILE).read_text())
    assert set(record["stages"]) == {"stage 1: vision tower", "stage 2: language model",
                                     "join: bridges on frozen backbones", "stage 3: bridges, then evaluation"}
    assert [phase["steps"] for phase in record["config"]["stage3"]] == [2, 3]
    assert (tmp_path / "out" / "stage3" / "phase1" / "model" / "config.json").is_file()   # phase 2 started there
    assert 0 <= record["stages"]["stage 1: vision tower"]["retrieval_top1"] <= 1
    assert 0 <= record["stages"]["stage 2: language model"]["text_binding"] <= 1
    assert 0 <= record["stages"]["stage 2: language model"]["text_binding_wide"] <= 1
    assert set(record["stages"]["stage 2: language model"]["text_answers"]) == {*ANSWERED_ATTRIBUTES, "all"}
    report = json.loads((model_dir / "eval.json").read_text())
    assert set(report["binding"]["shape"]["train"]) == {"model", "gates_closed"}
    assert set(report["binding"]["colour_shape"]["train"]["model"]) == {"0", "1"}
    model = flamingo.load_model(str(model_dir))
    assert model.config.num_latents == 4 and model.config.vis_dim == 32
    assert any(b.attn_gate.item() != 0 for b in model.gated_cross_attn_layers())   # stage 3 trained the gates

    capsys.readouterr()
    run_recipe(config, local=True, log_every=0)
    assert capsys.readouterr().out.count("already done, skipping") == 4


def test_recipe_errors_name_the_file_and_field(tmp_path: Path):
    bad = dict(SMALL, stage3=[SMALL["stage3"][0], {**SMALL["stage3"][1], "lr": -1}])
    with pytest.raises(ConfigError, match=r"recipe\.yaml: stage3\[1\]\.lr: must be positive"):
        load_recipe(write_recipe(tmp_path, **bad))
    with pytest.raises(ConfigError, match=r"recipe\.yaml: vision\.stepz: unknown field"):
        load_recipe(write_recipe(tmp_path, vision={"stepz": 3}))
    with pytest.raises(ConfigError, match=r"recipe\.yaml: stage3\[0\]\.output_dir: set by the recipe"):
        load_recipe(write_recipe(tmp_path, stage3=[{**SMALL["stage3"][0], "output_dir": "elsewhere"}]))
    result = CliRunner().invoke(main, ["recipe", str(write_recipe(tmp_path, lm={"vocab_size": 3}))])
    assert result.exit_code != 0 and "lm.vocab_size" in result.output


def test_the_bundled_recipe_file_is_valid():
    config = load_recipe(REPO / "jobs" / "train_configs" / "miniature.yaml")
    first, *_ = config.train_configs()
    assert first.model.endswith("miniature") and config.eval.shots == (0, 1, 2, 4, 8)


def test_the_recipe_builds_the_tower_the_bundled_model_records():
    # The bundled model must be what its recipe makes: a stage-1 setting changed in one and not the other fails.
    bundled = json.loads((BUNDLED_DIR / "miniature" / "config.json").read_text())
    recipe = load_recipe(REPO / "jobs" / "train_configs" / "miniature.yaml")
    assert clip_config(recipe.vision) == bundled["vision_encoder_config"]
