"""The vision-tower probe (training/probe_vision.py) reads what a tower's features hold about single objects."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from training.pretrain_vision import VisionPretrainConfig, build_clip, save_vision
from training.probe_vision import ATTRIBUTES, load_tower, main, recentred, single_object_scenes
from training.synthetic import GRID


def test_probe_scenes_are_single_objects_and_the_splits_differ() -> None:
    train, test = single_object_scenes(20, 0), single_object_scenes(20, 1)
    assert all(len(s.objects) == 1 for s in train + test)
    assert [s.objects for s in train] != [s.objects for s in test]
    assert [s.objects for s in train] == [s.objects for s in single_object_scenes(20, 0)]   # reproducible


def test_a_stage_one_tower_folder_is_probed_from_the_command_line(tmp_path: Path, capsys) -> None:
    # Even an untrained tower passes colour through (the pixels' colour is linear in its patch tokens), and
    # its concatenated patch tokens keep position (which slot holds the object): a probe that missed these
    # would be broken, not the tower.
    config = VisionPretrainConfig(layers=1, width=64, head_width=32)
    save_vision(build_clip(config), config, tmp_path / "vision")
    out = tmp_path / "probe.json"
    main([str(tmp_path / "vision"), "--train", "300", "--test", "200", "--json", str(out)])
    result = json.loads(out.read_text())
    assert set(result) == {"pooled", "mean-patch", "patch"}            # no resampler in a stage-1 folder
    assert all(set(row) == set(ATTRIBUTES) for row in result.values())
    assert result["patch"]["colour"]["accuracy"] >= 0.9
    assert result["patch"]["position"]["accuracy"] >= 0.9
    low, high = result["patch"]["colour"]["ci95"]
    assert low <= result["patch"]["colour"]["accuracy"] <= high and result["patch"]["colour"]["n"] == 200
    assert capsys.readouterr().out.splitlines()[0].split() == ["features", *ATTRIBUTES]


@pytest.mark.slow
def test_the_bundled_model_is_probed_through_its_resampler_too(tmp_path: Path, capsys) -> None:
    out = tmp_path / "probe.json"
    main(["miniature", "--train", "300", "--test", "200", "--json", str(out)])
    result = json.loads(out.read_text())
    assert set(result) == {"pooled", "mean-patch", "patch", "resampled"}
    assert result["resampled"]["colour"]["n"] == 200
    assert "resampled" in capsys.readouterr().out


def test_the_untrained_control_is_the_same_tower_with_fresh_weights() -> None:
    trained, perceiver = load_tower("miniature")
    fresh, no_perceiver = load_tower("miniature", untrained=True)
    assert perceiver is not None and no_perceiver is None
    shapes = {name: p.shape for name, p in trained.named_parameters()}
    assert shapes == {name: p.shape for name, p in fresh.named_parameters()}
    assert not torch.equal(trained.positional_embedding, fresh.positional_embedding)
    again, _ = load_tower("miniature", untrained=True)
    assert torch.equal(fresh.positional_embedding, again.positional_embedding)     # seeded


def test_recentred_scenes_keep_their_cells_and_move_their_centres_in() -> None:
    scenes = single_object_scenes(40, 0)
    cell = 64 / GRID
    for max_offset in (0.0, 1.7):
        for scene, moved in zip(scenes, (recentred(s, max_offset) for s in scenes)):
            (o,), (m,) = scene.objects, moved.objects
            assert (m.row, m.col, m.shape, m.colour, m.size) == (o.row, o.col, o.shape, o.colour, o.size)
            for value, index in ((m.x, m.col), (m.y, m.row)):
                assert abs(value - (index + 0.5) * cell) <= max_offset + 0.01
    wandering = [s for s in scenes if abs(s.objects[0].x - (s.objects[0].col + 0.5) * cell) > 1]
    assert wandering and all((recentred(s, 0).image() != s.image()).any() for s in wandering)


def test_small_objects_shape_is_probed_by_offset_with_a_pixel_control(tmp_path: Path, capsys) -> None:
    # Centred exactly, a small shape of a given colour in a given cell is always the same pixels: even an
    # untrained tower's tokens then tell the shapes apart, and raw pixels much better than when the shape
    # wanders about its cell (near chance, 0.25): the difference is what the probe is for.
    config = VisionPretrainConfig(layers=1, width=64, head_width=32)
    save_vision(build_clip(config), config, tmp_path / "vision")
    out = tmp_path / "small.json"
    main([str(tmp_path / "vision"), "--small-shapes", "drawn,0", "--train", "400", "--test", "200",
          "--json", str(out)])
    result = json.loads(out.read_text())
    assert set(result) == {"drawn", "0"}
    assert all(set(row) == {"patch", "mean-patch", "pixels"} for row in result.values())
    assert all(r["n"] == 200 for row in result.values() for r in row.values())
    assert result["0"]["patch"]["accuracy"] >= 0.85
    assert result["drawn"]["pixels"]["accuracy"] < result["0"]["pixels"]["accuracy"] - 0.15
    assert "small objects' shape, centre within drawn px" in capsys.readouterr().out
