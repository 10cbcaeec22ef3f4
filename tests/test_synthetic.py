"""The synthetic world and its shards: determinism, ground truth that agrees with the drawn pixels,
fast-binding episodes, and shards the pipeline's reader takes like user data (no Ray started here)."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import decord
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from media.files import DEFAULT_MAX_ITEM_BYTES, file_rows, list_files
from training import shards
from training.synthetic import (
    BACKGROUND,
    COLOURS,
    DIRECTIONS,
    GRID,
    NUMBER_WORDS,
    SHAPES,
    Clip,
    Scene,
    existence_questions,
    make_binding_episode,
    make_clip,
    make_scene,
    nonsense_words,
    scene_variant,
)

SEEDS = range(40)


def _mode(patch: np.ndarray) -> tuple[int, ...]:
    """The most common colour in a (h, w, 3) patch."""
    return Counter(map(tuple, patch.reshape(-1, 3).tolist())).most_common(1)[0][0]


def _centre_colour(pixels: np.ndarray, x: float, y: float) -> tuple[int, ...]:
    col, row = round(x), round(y)
    return _mode(pixels[row - 1 : row + 2, col - 1 : col + 2])


def _answer(sample: Scene | Clip, question: str) -> str:
    return next(qa.answer for qa in sample.qa() if qa.question == question)


def _decode(mp4: bytes) -> np.ndarray:
    reader = decord.VideoReader(io.BytesIO(mp4), ctx=decord.cpu(0), num_threads=1)
    return reader.get_batch(list(range(len(reader)))).asnumpy()


# --- determinism ---------------------------------------------------------------------------------


def test_same_seed_gives_identical_bytes_and_other_seeds_differ() -> None:
    assert make_scene(7).png() == make_scene(7).png()
    assert make_clip(7).mp4() == make_clip(7).mp4()
    assert make_scene(7) == make_scene(np.random.default_rng(7))  # a Generator is a seed too
    assert len({make_scene(seed).png() for seed in range(10)}) == 10
    assert len({make_clip(seed).mp4() for seed in range(5)}) == 5
    assert make_binding_episode(3, ways=3, shots=2) == make_binding_episode(3, ways=3, shots=2)
    assert nonsense_words(5, 8) == nonsense_words(5, 8) != nonsense_words(6, 8)


def test_media_bytes_do_not_depend_on_the_process() -> None:
    """Nothing like a wall-clock time or a thread count slips into the PNG / mp4 bytes."""
    code = ("from training.synthetic import *; import sys; "
            "sys.stdout.buffer.write(make_scene(3).png() + make_clip(3).mp4())")
    repo = Path(__file__).parents[1]
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True, cwd=repo).stdout
    assert other == make_scene(3).png() + make_clip(3).mp4()


def test_scenes_hold_min_to_max_objects() -> None:
    assert {len(make_scene(seed, max_objects=3).objects) for seed in range(60)} == {1, 2, 3}
    assert {len(make_scene(seed, min_objects=2, max_objects=3).objects) for seed in range(60)} == {2, 3}
    assert make_scene(7, min_objects=1) == make_scene(7)   # the default draws exactly as before
    with pytest.raises(ValueError, match="min_objects <= max_objects"):
        make_scene(0, min_objects=4, max_objects=3)


# --- scenes: ground truth against pixels ---------------------------------------------------------


def test_each_object_is_drawn_in_its_colour_inside_its_cell() -> None:
    for seed in SEEDS:
        scene = make_scene(seed)
        pixels = np.asarray(Image.open(io.BytesIO(scene.png())))
        assert pixels.shape == (64, 64, 3)
        cell = scene.image_size / GRID
        for obj in scene.objects:
            assert _centre_colour(pixels, obj.x, obj.y) == COLOURS[obj.colour]
            assert (int(obj.x // cell), int(obj.y // cell)) == (obj.col, obj.row)
        # no antialiasing: exactly the background and the objects' colours
        drawn = set(map(tuple, pixels.reshape(-1, 3).tolist()))
        assert drawn == {BACKGROUND} | {COLOURS[o.colour] for o in scene.objects}


def test_scene_variants_change_exactly_one_attribute_of_one_object() -> None:
    changed = Counter()
    for seed in SEEDS:
        scene = make_scene(seed)
        variant = scene_variant(seed, scene)
        assert variant == scene_variant(seed, scene) and variant.caption() != scene.caption()
        diffs = [(a, b) for a, b in zip(scene.objects, variant.objects) if a != b]
        assert len(diffs) == 1 and len(variant.objects) == len(scene.objects)
        (old, new), = diffs
        fields = [f for f in ("shape", "colour", "size") if getattr(old, f) != getattr(new, f)]
        fields += ["cell"] if (old.row, old.col) != (new.row, new.col) else []
        assert len(fields) == 1, (old, new)
        changed[fields[0]] += 1
        assert len({(o.colour, o.shape) for o in variant.objects}) == len(variant.objects)   # still unambiguous
        assert len({(o.row, o.col) for o in variant.objects}) == len(variant.objects)
    assert set(changed) == {"shape", "colour", "size", "cell"}


def test_scene_variants_change_only_the_attributes_asked_for() -> None:
    for seed in SEEDS:
        scene = make_scene(seed)
        (old, new), = [(a, b) for a, b in zip(scene.objects, scene_variant(seed, scene, ("shape",)).objects)
                       if a != b]
        assert old.shape != new.shape and (old.colour, old.size, old.row, old.col) == (new.colour, new.size,
                                                                                      new.row, new.col)


def test_captions_and_answers_agree_with_the_pixels() -> None:
    for seed in SEEDS:
        scene = make_scene(seed)
        pixels = scene.image()
        objects = scene.objects
        assert 1 <= len(objects) <= 3
        assert len({(o.colour, o.shape) for o in objects}) == len(objects)
        assert _answer(scene, "How many shapes are there?") == NUMBER_WORDS[len(objects)]
        caption = scene.caption()
        assert caption.startswith("a ") and caption.endswith(".")
        for obj in objects:
            assert obj.description in caption
            if sum(o.shape == obj.shape for o in objects) == 1:
                colour = _answer(scene, f"What colour is the {obj.shape}?")
                assert COLOURS[colour] == _centre_colour(pixels, obj.x, obj.y)
        for qa in scene.qa():
            match = re.fullmatch(r"Is the (.+) (left of|above) the (.+)\?", qa.question)
            if match:
                a, b = (_referred(objects, name) for name in match.group(1, 3))
                truth = a.x < b.x if match.group(2) == "left of" else a.y < b.y
                assert qa.answer == ("yes" if truth else "no")
                assert qa.attribute == "relation"


def _referred(objects, name: str):
    """The one object that 'circle' or 'red circle' refers to."""
    matches = [o for o in objects if name in (o.shape, o.name)]
    assert len(matches) == 1, (name, objects)
    return matches[0]


def test_questions_cover_every_attribute_with_unambiguous_references() -> None:
    attributes = set()
    for seed in SEEDS:
        scene = make_scene(seed)
        for qa in scene.qa():
            attributes.add(qa.attribute)
            match = re.search(r"the (\w+ )?(circle|square|triangle|star)\b", qa.question)
            if match:
                _referred(scene.objects, match.group(0)[len("the "):])
    assert attributes == {"count", "colour", "shape", "size", "position", "relation"}   # existence: when named


def test_existence_questions_are_true_of_the_pixels_and_balanced() -> None:
    """'Is there a red shape?' / 'Is there a circle?': the answer follows the drawn pixels (a red object's
    centre is red), every scene gets each kind once with 'yes' and once with 'no', and over many scenes
    every colour and every shape is asked about both ways (no colour is a cue for the answer)."""
    asked: Counter[tuple[str, str]] = Counter()
    rng = np.random.default_rng(0)
    for seed in range(200):
        scene = make_scene(seed)
        centres = {_centre_colour(scene.image(), o.x, o.y) for o in scene.objects}
        drawn = {name for name, rgb in COLOURS.items() if rgb in centres}
        existence = existence_questions(scene.objects, rng)
        assert {qa.attribute for qa in existence} == {"existence"}
        assert sorted(qa.answer for qa in existence) == ["no", "no", "yes", "yes"]
        for qa in existence:
            colour = re.fullmatch(r"Is there a (\w+) shape\?", qa.question)
            if colour:
                assert qa.answer == ("yes" if colour.group(1) in drawn else "no"), (seed, qa)
                asked[colour.group(1), qa.answer] += 1
            else:
                shape = re.fullmatch(r"Is there a (\w+)\?", qa.question)
                assert shape is not None and shape.group(1) in SHAPES, qa
                assert qa.answer == ("yes" if any(o.shape == shape.group(1) for o in scene.objects) else "no")
                asked[shape.group(1), qa.answer] += 1
    assert all(asked[option, answer] >= 10 for option in (*COLOURS, *SHAPES) for answer in ("yes", "no")), asked


def test_what_else_is_in_the_scene_does_not_give_away_a_no() -> None:
    """The colour a 'no' asks about is drawn from all absent ones, so the rest of the scene carries no cue.
    Picking the next absent colour in a fixed order asked 'red? no' only of scenes with purple in them
    (purple comes before red): every time, where a fair draw gives about a third."""
    names = list(COLOURS)
    neighbour_present = no_questions = 0
    rng = np.random.default_rng(0)
    for seed in range(400):
        scene = make_scene(seed)
        present = {o.colour for o in scene.objects}
        for qa in existence_questions(scene.objects, rng):
            colour = re.fullmatch(r"Is there a (\w+) shape\?", qa.question)
            if colour and qa.answer == "no":
                no_questions += 1
                neighbour_present += names[names.index(colour.group(1)) - 1] in present
    assert no_questions == 400
    assert neighbour_present / no_questions < 0.6, neighbour_present / no_questions


# --- clips ---------------------------------------------------------------------------------------


def test_clip_decodes_with_decord_and_objects_move_as_stated() -> None:
    checked = Counter()
    for seed in range(16):
        clip = make_clip(seed)
        frames = _decode(clip.mp4())
        assert frames.shape == (clip.num_frames, 64, 64, 3)
        assert np.abs(frames.astype(int) - clip.frames()).mean() < 3  # near-lossless
        for obj in clip.objects:
            if sum(o.colour == obj.colour for o in clip.objects) > 1:
                continue  # the pixel mask below needs the object's colour to be its own
            first, last = (_centroid(frames[t], obj.colour) for t in (0, clip.num_frames - 1))
            moved = last - first
            axis = int(np.argmax(np.abs(moved)))
            seen = [name for name, step in DIRECTIONS.items() if step[axis] == np.sign(moved[axis])][0]
            assert seen == _answer(clip, f"Which way does {_reference(clip, obj)} move?") == obj.direction
            assert abs(np.abs(moved).max() - obj.step * (clip.num_frames - 1)) < 1.5
            checked[obj.direction] += 1
    assert set(checked) == set(DIRECTIONS)


def _centroid(frame: np.ndarray, colour: str) -> np.ndarray:
    """(x, y) centre of the pixels nearer to `colour` than to any other colour or the background."""
    palette = np.array([BACKGROUND, *COLOURS.values()], dtype=int)
    nearest = np.abs(frame[:, :, None, :].astype(int) - palette).sum(-1).argmin(-1)
    rows, cols = np.nonzero(nearest == 1 + list(COLOURS).index(colour))
    return np.array([cols.mean(), rows.mean()])


def _reference(clip: Clip, obj) -> str:
    return f"the {obj.shape}" if sum(o.shape == obj.shape for o in clip.objects) == 1 else f"the {obj.name}"


def test_clip_caption_and_answers() -> None:
    clip = make_clip(2)
    for obj in clip.objects:
        assert f"a {obj.description} moves {obj.direction}" in clip.caption()
        assert _answer(clip, f"How fast does {_reference(clip, obj)} move?") == obj.speed
    with pytest.raises(ValueError, match="leave the frame"):
        make_clip(0, num_frames=32)


# --- fast binding --------------------------------------------------------------------------------


@pytest.mark.parametrize("category", ["shape", "colour_shape"])
def test_binding_episodes_bind_each_word_to_one_category(category: str) -> None:
    for seed in range(20):
        episode = make_binding_episode(seed, ways=3, shots=2, category=category)
        words = episode.words
        assert len(set(words)) == len(set(episode.categories)) == 3
        assert episode.answer in words and episode.chance == pytest.approx(1 / 3)
        assert len(episode.support) == len(episode.support_texts) == 6
        bound = dict(zip(episode.categories, words))
        for scene, text in zip(episode.support, episode.support_texts):
            (obj,) = scene.objects
            key = obj.shape if category == "shape" else obj.name
            assert text == f"This is a {bound[key]}."
            assert _centre_colour(scene.image(), obj.x, obj.y) == COLOURS[obj.colour]
        assert Counter(episode.support_texts) == {f"This is a {w}.": 2 for w in words}
        (query,) = episode.query.objects
        assert bound[query.shape if category == "shape" else query.name] == episode.answer
        layout = lambda o: (o.shape, o.colour, o.size, o.row, o.col)  # noqa: E731
        assert all(layout(query) != layout(s.objects[0]) for s in episode.support)
        assert episode.query_image().shape == (64, 64, 3) and len(episode.support_images()) == 6


def test_nonsense_words_are_fresh() -> None:
    texts = []
    for seed in range(20):
        scene, clip = make_scene(seed), make_clip(seed)
        texts += [scene.caption(), clip.caption()] + [f"{qa.question} {qa.answer}" for qa in scene.qa() + clip.qa()]
    vocabulary = set(re.findall(r"[a-z]+", " ".join(texts).lower()))
    words = nonsense_words(0, 200)
    assert len(set(words)) == 200
    assert all(re.fullmatch(r"([bdfgklmnprstvwz]+[aeiou]){2}[bdgkmnptx]", w) for w in words)
    assert not vocabulary & set(words) and not set(SHAPES) & set(words)


# --- shards --------------------------------------------------------------------------------------


def test_webdataset_shard_groups_members_by_key(tmp_path: Path) -> None:
    samples = [make_scene(1), make_scene(2), make_clip(3)]
    path = shards.write_webdataset(tmp_path / "a.tar", samples)
    assert shards.write_webdataset(tmp_path / "b.tar", samples).read_bytes() == path.read_bytes()
    with tarfile.open(path) as tar:
        members = tar.getmembers()
        contents = {m.name: tar.extractfile(m).read() for m in members}
    assert [m.name for m in members] == [
        "000000.png", "000000.txt", "000000.json",
        "000001.png", "000001.txt", "000001.json",
        "000002.mp4", "000002.txt", "000002.json",
    ]
    assert {(m.mtime, m.uid, m.gid, m.mode) for m in members} == {(0, 0, 0, 0o644)}
    assert contents["000000.png"] == samples[0].png() and contents["000002.mp4"] == samples[2].mp4()
    meta = json.loads(contents["000002.json"])
    assert meta["caption"] == contents["000002.txt"].decode() == samples[2].caption()
    assert meta["kind"] == "video"
    assert [o["direction"] for o in meta["objects"]] == [o.direction for o in samples[2].objects]
    assert {"question", "answer", "attribute"} == set(meta["qa"][0])
    with pytest.raises(ValueError, match="sort after"):
        out_of_order = [shards.ShardItem("2", samples[0]), shards.ShardItem("1", samples[1])]
        shards.write_webdataset(tmp_path / "c.tar", out_of_order)
    assert not (tmp_path / "c.tar").exists() and not list(tmp_path.glob(".*"))


def test_parquet_shard_has_img2dataset_columns(tmp_path: Path) -> None:
    scenes = [make_scene(seed) for seed in range(5)]
    path = shards.write_img2dataset_parquet(tmp_path / "a.parquet", scenes)
    assert shards.write_img2dataset_parquet(tmp_path / "b.parquet", scenes).read_bytes() == path.read_bytes()
    table = pq.read_table(path)
    assert table.column_names == ["key", "url", "caption", "png", "status", "error_message", "width", "height", "json"]
    assert table.num_rows == 5
    rows = table.to_pylist()
    assert [r["key"] for r in rows] == [f"{i:06d}" for i in range(5)]
    assert {r["status"] for r in rows} == {"success"} and {r["error_message"] for r in rows} == {None}
    for row, scene in zip(rows, scenes):
        assert Image.open(io.BytesIO(row["png"])).size == (row["width"], row["height"]) == (64, 64)
        assert row["caption"] == json.loads(row["json"])["caption"] == scene.caption()
    with pytest.raises(ValueError, match="images only"):
        shards.write_img2dataset_parquet(tmp_path / "c.parquet", [make_clip(0)])


def test_make_shards_numbers_keys_across_shards(tmp_path: Path) -> None:
    paths = shards.make_shards(tmp_path / "wds", n_images=5, n_clips=2, seed=4, shard_size=3)
    assert [p.name for p in paths] == ["00000.tar", "00001.tar", "00002.tar"]
    names = [name for p in paths for name in tarfile.open(p).getnames()]
    media = [n for n in names if n.endswith((".png", ".mp4"))]
    assert media == [f"{i:06d}.png" for i in range(5)] + ["000005.mp4", "000006.mp4"]
    # sample i is regenerable on its own from (seed, kind, i), as its url says
    with tarfile.open(paths[2]) as tar:
        meta = json.loads(tar.extractfile("000006.json").read())
        assert meta["url"] == "synthetic://video/4/1"
        assert tar.extractfile("000006.mp4").read() == make_clip((4, 1, 1)).mp4()

    parquet = shards.make_shards(tmp_path / "pq", n_images=5, seed=4, shard_size=2, format="parquet")
    assert [pq.read_metadata(p).num_rows for p in parquet] == [2, 2, 1]
    with pytest.raises(ValueError, match="images only"):
        shards.make_shards(tmp_path / "pq", n_images=1, n_clips=1, format="parquet")


def test_sample_set_is_small_and_complete(tmp_path: Path) -> None:
    shards.main(["sample", str(tmp_path)])
    (path,) = tmp_path.iterdir()
    assert path.stat().st_size < 300 * 1024
    kinds = Counter(name.rsplit(".", 1)[1] for name in tarfile.open(path).getnames())
    assert kinds == {"png": 16, "mp4": 4, "txt": 20, "json": 20}


def test_pipeline_reads_the_shards_like_user_data(tmp_path: Path) -> None:
    shards.make_shards(tmp_path, n_images=3, n_clips=2, seed=1, shard_size=5)
    shards.make_shards(tmp_path / "pq", n_images=3, seed=2, format="parquet")
    files = list_files(str(tmp_path))
    assert [Path(f.uri).name for f in files] == ["00000.tar", "00000.parquet"]
    for listed in files:  # the read task body, called directly: no Ray here
        rows = list(file_rows(listed.uri, listed.size, None, DEFAULT_MAX_ITEM_BYTES))
        assert all(row["error"] is None for row in rows), rows
        kinds = [row["media_kind"] for row in rows]
        assert kinds == (["image"] * 3 + ["video"] * 2 if listed.uri.endswith(".tar") else ["image"] * 3)
        assert all(row["caption"] and row["url"].startswith("synthetic://") for row in rows)
