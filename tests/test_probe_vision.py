"""The vision-tower probe (training/probe_vision.py) reads what a tower's features hold about single objects."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from training.pretrain_vision import VisionPretrainConfig, build_clip, save_vision
from training.probe_vision import (
    ATTRIBUTES,
    OBJECT_ATTRIBUTES,
    fit_attention_probe,
    load_tower,
    main,
    object_scenes,
    recentred,
    single_object_scenes,
)
from training.synthetic import GRID, SHAPES


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


def test_object_scenes_name_one_object_by_its_shape() -> None:
    train, test = object_scenes(30, 0), object_scenes(30, 1)
    for scene, asked in train + test:
        shapes = [o.shape for o in scene.objects]
        assert 2 <= len(shapes) <= 3 and len(set(shapes)) == len(shapes) and 0 <= asked < len(shapes)
    assert [s.objects for s, _ in train] != [s.objects for s, _ in test]
    assert [(s.objects, i) for s, i in train] == [(s.objects, i) for s, i in object_scenes(30, 0)]


def test_the_attention_probe_reads_a_kept_binding_and_not_a_pooled_one() -> None:
    # Tokens that each say (shape, colour) of one object keep which colour goes with which shape; their mean
    # says which shapes and colours are there but not which with which. The probe must tell the two apart.
    generator = torch.Generator().manual_seed(0)
    n, objects, colours = 3000, 3, 5
    shape = torch.stack([torch.randperm(len(SHAPES), generator=generator)[:objects] for _ in range(n)])
    colour = torch.randint(colours, (n, objects), generator=generator)
    kept = torch.cat([torch.nn.functional.one_hot(shape, len(SHAPES)),
                      torch.nn.functional.one_hot(colour, colours)], -1).float()   # (n, objects, 9)
    pooled = kept.mean(1, keepdim=True).expand_as(kept)
    asked = torch.randint(objects, (n,), generator=generator)
    target, asked_shape = colour[torch.arange(n), asked], shape[torch.arange(n), asked]
    train, test = slice(0, 2500), slice(2500, n)
    accuracy = {}
    for name, tokens in (("kept", kept), ("pooled", pooled)):
        model = fit_attention_probe(tokens[train], asked_shape[train], target[train], colours, steps=400)
        with torch.no_grad():
            accuracy[name] = (model(tokens[test], asked_shape[test]).argmax(-1) == target[test]).float().mean().item()
    assert accuracy["kept"] >= 0.95
    assert accuracy["pooled"] <= 0.55        # one of the scene's (up to) 3 colours, by guess


def test_objects_are_probed_from_the_command_line(tmp_path: Path, capsys) -> None:
    config = VisionPretrainConfig(layers=1, width=64, head_width=32)
    save_vision(build_clip(config), config, tmp_path / "vision")
    out = tmp_path / "objects.json"
    main([str(tmp_path / "vision"), "--objects", "--train", "300", "--test", "100", "--json", str(out)])
    result = json.loads(out.read_text())
    assert set(result) == {"patch"}                                       # no resampler in a stage-1 folder
    assert set(result["patch"]) == set(OBJECT_ATTRIBUTES)
    assert all(r["n"] == 100 and r["ci95"][0] <= r["accuracy"] <= r["ci95"][1] for r in result["patch"].values())
    assert capsys.readouterr().out.splitlines()[0].split() == ["features", *OBJECT_ATTRIBUTES]
