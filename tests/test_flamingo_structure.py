"""The shape of the model library: one build path from configs, presets as data, light modules that load
without torch. (Import cycles, here and between packages: test_layout.py.)"""

import subprocess
import sys
from pathlib import Path

import open_clip
import pytest

import flamingo
from flamingo import presets
from flamingo.builder import build
from flamingo.config import FlamingoConfig

PACKAGE = Path(flamingo.__file__).parent


def test_light_modules_load_without_torch():
    code = ("import sys, flamingo, flamingo.config, flamingo.tokens, flamingo.presets\n"
            "flamingo.image_preprocessing('tiny-random'), flamingo.DEFAULT_MODEL, flamingo.PRESETS\n"
            "print(sorted({'torch', 'transformers', 'open_clip'} & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_presets_are_configs_and_lookups_copy_them():
    assert all(isinstance(c, FlamingoConfig) for c in flamingo.PRESETS.values())
    config = presets.from_name("openflamingo-4b")
    assert config == flamingo.PRESETS["openflamingo/OpenFlamingo-4B-vitl-rpj3b"]
    assert config.openflamingo_checkpoint == "openflamingo/OpenFlamingo-4B-vitl-rpj3b"
    config.vision_encoder_config = {"changed": True}
    assert presets.from_name("openflamingo-4b").vision_encoder_config is None
    with pytest.raises(ValueError, match="unknown preset 'nope'.*tiny-random"):
        presets.from_name("nope")


@pytest.mark.parametrize("name", sorted(flamingo.PRESETS))
def test_preset_image_size_is_its_towers(name):
    """Presets state their image size so pipelines can preprocess without a model; it must be the tower's."""
    config = flamingo.PRESETS[name]
    vision = config.vision_encoder_config or open_clip.get_model_config(config.vision_encoder)
    assert config.image_size == vision["vision_cfg"]["image_size"]


def test_the_config_a_model_carries_is_complete_and_rebuilds_it():
    model = flamingo.from_preset("tiny-random", seed=3)
    config = model.config
    assert (config.vis_dim, config.image_size, config.decoder_layers_attr_name) == (64, 32, "model.layers")
    assert config.added_token_ids == model.tokenizer.convert_tokens_to_ids(["<|endofchunk|>", "<image>", "<PAD>"])
    assert all(float(b.attn_gate) == 0.5 for b in model.gated_cross_attn_layers())
    again = build(config, seed=3)
    assert again.config == config
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert a.equal(b), name


def test_old_config_files_load_with_defaults_for_new_fields():
    config = FlamingoConfig.load(presets.BUNDLED_DIR / "miniature" / "config.json")
    assert config.gate_init == 0.0 and config.openflamingo_checkpoint is None
    with pytest.raises(ValueError, match="unknown Flamingo config fields: nope"):
        FlamingoConfig.from_dict({**config.to_dict(), "nope": 1})


def test_an_image_size_the_tower_does_not_take_is_an_error():
    config = presets.from_name("tiny-random")
    config.image_size = 64
    with pytest.raises(ValueError, match="image_size 64.*takes 32"):
        build(config)


def test_top_level_names_are_not_shadowed_by_submodules():
    """Importing a submodule binds its name on the package: no export may share a module's name."""
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(flamingo.__path__):
        importlib.import_module(f"flamingo.{info.name}")
    assert callable(flamingo.build) and callable(flamingo.load_model)
    assert not set(flamingo.__all__) & {info.name for info in pkgutil.iter_modules(flamingo.__path__)}
