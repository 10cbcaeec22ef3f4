"""Task files: loading, validation messages, hashing and prompt rendering (pipeline/task.py)."""

from __future__ import annotations

import logging
import random
import shutil
import textwrap
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from sample_media import video_bytes

from flamingo.tokens import END_OF_CHUNK_TOKEN, MEDIA_TOKEN
from flamingo_annotate.cli import main
from pipeline.task import (
    Demonstration,
    GenerationOptions,
    Problem,
    TaskError,
    VideoOptions,
    check_tasks,
    load_task,
    load_tasks,
)

JOBS = Path(__file__).resolve().parents[1] / "jobs"
EXAMPLES = sorted((JOBS / "tasks").glob("*.yaml"))
DEMO_IMAGE = JOBS / "tasks" / "demos" / "one.png"
CORRUPT_PNG = random.Random(0).randbytes(2000)  # what a failed download or a renamed file looks like


def write(directory: Path, text: str, name: str = "task.yaml") -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def task_dir(tmp_path: Path) -> Path:
    """A folder with two demonstration images next to where the task files go."""
    (tmp_path / "demos").mkdir()
    shutil.copy(DEMO_IMAGE, tmp_path / "demos" / "a.png")
    shutil.copy(DEMO_IMAGE, tmp_path / "demos" / "b.png")
    return tmp_path


def problems_of(path: Path, **options) -> tuple[Problem, ...]:
    with pytest.raises(TaskError) as raised:
        load_task(path, **options)
    error = raised.value
    assert isinstance(error, ValueError)
    assert str(error) == "\n".join(map(str, error.problems))
    return error.problems


def only_problem(path: Path, **options) -> Problem:
    problems = problems_of(path, **options)
    assert len(problems) == 1, problems
    return problems[0]


# --- valid files -------------------------------------------------------------------------------------------------

def test_shipped_examples_load_with_their_demonstration_media() -> None:
    assert {p.stem for p in EXAMPLES} >= {"caption", "count"}
    tasks = load_tasks(EXAMPLES)
    by_name = {t.name: t for t in tasks}
    assert by_name["count"].kind == "classify" and by_name["count"].labels == (" one", " two", " three")
    assert by_name["caption"].kind == "generate"
    for task in tasks:
        assert 1 <= len(task.demonstrations) <= 4          # few-shot: each shows the model its answers
        for demo in task.demonstrations:
            assert Path(demo.media).is_file() and Path(demo.media).stat().st_size < 10_000
            assert demo.media_type == "image"


def test_shipped_sample_input_is_a_small_shard_of_scenes_and_clips() -> None:
    from media.files import file_rows

    (shard,) = sorted((JOBS / "sample").iterdir())
    assert shard.suffix == ".tar" and shard.stat().st_size < 300_000
    rows = list(file_rows(str(shard), shard.stat().st_size, None, 10_000_000))
    kinds = [row["media_kind"] for row in rows]
    assert kinds.count("image") >= 8 and kinds.count("video") >= 2
    assert all(row["error"] is None and row["caption"] for row in rows)   # ground truth travels with each item


def test_full_file_loads_into_frozen_dataclasses(task_dir: Path) -> None:
    path = write(task_dir, """
        name: shape-check_2
        kind: classify
        instruction: "Name the shape. "
        demonstrations:
          - media: demos/a.png
            text: circle
          - media: demos/b.png
            text: square
        query: "Answer:"
        labels: [circle, square, "yes"]
        generation: {max_new_tokens: 4, num_beams: 2, do_sample: true, temperature: 0.7, top_k: 5, top_p: 0.9,
                     length_normalize: false}
        video: {num_frames: 4, fps: 2}
        output_column: shape
    """)
    task = load_task(path)
    assert task.name == "shape-check_2" and task.kind == "classify" and task.output_column == "shape"
    assert task.path == str(path.resolve())
    assert task.demonstrations == (Demonstration(str(task_dir / "demos" / "a.png"), "circle"),
                                   Demonstration(str(task_dir / "demos" / "b.png"), "square"))
    assert task.labels == ("circle", "square", "yes")
    assert task.generation == GenerationOptions(max_new_tokens=4, num_beams=2, do_sample=True, temperature=0.7,
                                                top_k=5, top_p=0.9, length_normalize=False)
    assert task.video == VideoOptions(num_frames=4, fps=2.0)
    with pytest.raises(AttributeError):
        task.name = "other"  # type: ignore[misc]


def test_defaults_for_a_minimal_file(tmp_path: Path) -> None:
    task = load_task(write(tmp_path, "name: zero_shot\n"))
    assert task.kind == "generate" and task.demonstrations == () and task.labels == ()
    assert task.output_column == "zero_shot" and task.query == "" and task.instruction == ""
    assert task.generation == GenerationOptions() and task.video == VideoOptions()
    assert task.prefix_text() == "" and task.query_text() == MEDIA_TOKEN


def test_media_paths_are_relative_to_the_task_file_not_the_working_directory(
        task_dir: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(task_dir, """
        name: t
        demonstrations: [{media: demos/a.png, text: x}, {media: "file://%s", text: y}]
    """ % (task_dir / "demos" / "b.png"))
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    task = load_task(path)
    assert [d.media for d in task.demonstrations] == [str(task_dir / "demos" / "a.png"),
                                                      str(task_dir / "demos" / "b.png")]


# --- prompts -----------------------------------------------------------------------------------------------------

def test_prompt_follows_the_openflamingo_layout(task_dir: Path) -> None:
    task = load_task(write(task_dir, """
        name: vqa
        instruction: "Answer briefly. "
        demonstrations:
          - {media: demos/a.png, text: red}
          - {media: demos/b.png, text: green}
        query: "Question: What color? Short answer:"
    """))
    assert task.prefix_text() == ("Answer briefly. "
                                  "<image>Question: What color? Short answer:red<|endofchunk|>"
                                  "<image>Question: What color? Short answer:green<|endofchunk|>")
    assert task.query_text() == "<image>Question: What color? Short answer:"
    assert task.prefix_text().count(MEDIA_TOKEN) == len(task.demonstrations)
    assert task.candidates() == ()


def test_classify_candidates_are_labels_ending_like_the_demonstrations(task_dir: Path) -> None:
    task = load_task(write(task_dir, """
        name: c
        kind: classify
        demonstrations: [{media: demos/a.png, text: cat}]
        labels: [cat, caterpillar]
    """))
    assert task.candidates() == (f"cat{END_OF_CHUNK_TOKEN}", f"caterpillar{END_OF_CHUNK_TOKEN}")
    assert task.prefix_text() == f"{MEDIA_TOKEN}cat{END_OF_CHUNK_TOKEN}"


# --- hash --------------------------------------------------------------------------------------------------------

def test_hash_is_of_the_file_bytes_stable_and_content_sensitive(tmp_path: Path) -> None:
    import hashlib

    path = write(tmp_path, "name: h\nquery: 'Output:'\n")
    first = load_task(path).sha256
    assert first == load_task(path).sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    path.write_text("name: h\nquery: 'Output: '\n")
    assert load_task(path).sha256 != first
    path.write_text("name: h\nquery: 'Output:'\n# a comment\n")
    assert load_task(path).sha256 != first


# --- invalid files: each problem names file, field and what is wrong ---------------------------------------------

BAD_FILES = [
    # (file content, field, words the problem must contain)
    ("kind: generate\n", "name", ["missing required field"]),
    ("name: 7\n", "name", ["must be a string", "int 7"]),
    ("name: Has Spaces\n", "name", ["must match", "[a-z0-9_-]+"]),
    ("name: t\nkind: clasify\n", "kind", ["unknown kind 'clasify'", "did you mean 'classify'"]),
    ("name: t\ninstructions: hi\n", "instructions", ["unknown key", "did you mean 'instruction'"]),
    ("name: t\nfoo: 1\n", "foo", ["unknown key", "valid keys: name, kind"]),
    ("name: t\ngeneration: {max_tokens: 5}\n", "generation.max_tokens",
     ["unknown key", "did you mean 'max_new_tokens'"]),
    ("name: t\ngeneration: [1]\n", "generation", ["must be a mapping", "a list"]),
    ("name: t\ngeneration: {num_beams: '2'}\n", "generation.num_beams", ["must be an integer", "str '2'"]),
    ("name: t\ngeneration: {num_beams: 1.5}\n", "generation.num_beams", ["must be an integer"]),
    ("name: t\ngeneration: {max_new_tokens: true}\n", "generation.max_new_tokens", ["must be an integer", "true"]),
    ("name: t\ngeneration: {do_sample: 'yes'}\n", "generation.do_sample", ["must be true or false"]),
    ("name: t\ngeneration: {num_beams: 0}\n", "generation.num_beams", [">= 1", "got 0"]),
    ("name: t\ngeneration: {max_new_tokens: 0}\n", "generation.max_new_tokens", [">= 1", "got 0"]),
    ("name: t\ngeneration: {temperature: 0}\n", "generation.temperature", ["> 0"]),
    ("name: t\ngeneration: {temperature: -1.0}\n", "generation.temperature", ["> 0"]),
    ("name: t\ngeneration: {top_p: 1.5}\n", "generation.top_p", ["(0, 1]", "1.5"]),
    ("name: t\ngeneration: {top_p: 0}\n", "generation.top_p", ["(0, 1]"]),
    ("name: t\ngeneration: {top_k: -1}\n", "generation.top_k", [">= 0"]),
    ("name: t\nvideo: {num_frames: 0}\n", "video.num_frames", [">= 1"]),
    # upper bounds: typos that would only fail (or exhaust memory) once the job runs
    ("name: t\ngeneration: {max_new_tokens: 1000000000}\n", "generation.max_new_tokens",
     ["<= 1024", "got 1000000000"]),
    ("name: t\ngeneration: {max_new_tokens: 1025}\n", "generation.max_new_tokens", ["<= 1024", "got 1025"]),
    ("name: t\ngeneration: {max_new_tokens: 1e9}\n", "generation.max_new_tokens",
     ["must be an integer", "str '1e9'", "YAML reads 1e9 as text", "1000000000"]),
    ("name: t\ngeneration: {max_new_tokens: 1.0e+9}\n", "generation.max_new_tokens",
     ["must be an integer", "float 1000000000.0"]),
    ("name: t\ngeneration: {temperature: 1e-3}\n", "generation.temperature",
     ["must be a number", "YAML reads 1e-3 as text", "1.0e-3"]),
    ("name: t\ngeneration: {num_beams: 100000}\n", "generation.num_beams", ["<= 16", "got 100000"]),
    ("name: t\ngeneration: {top_k: 1001}\n", "generation.top_k", ["<= 1000", "got 1001"]),
    ("name: t\nvideo: {num_frames: 65}\n", "video.num_frames", ["<= 64", "got 65"]),
    ("name: %s\n" % ("a" * 65), "name", ["too long: 65 characters (at most 64)"]),
    ("name: t\noutput_column: %s\n" % ("a" * 65), "output_column", ["too long: 65 characters (at most 64)"]),
    ("name: t\nquery: %s\n" % ("q" * 10_001), "query", ["too long: 10001 characters (at most 10000)"]),
    ("name: t\ninstruction: %s\n" % ("q" * 10_001), "instruction", ["too long: 10001 characters"]),
    ("name: t\ndemonstrations: [{media: demos/a.png, text: %s}]\n" % ("x" * 10_001), "demonstrations[0].text",
     ["too long: 10001 characters"]),
    ("name: t\ndemonstrations: [{media: demos/%s.png, text: x}]\n" % ("m" * 4096), "demonstrations[0].media",
     ["too long: 4106 characters (at most 4096)"]),
    ("name: t\ndemonstrations: [" + ", ".join(["{media: demos/a.png, text: x}"] * 65) + "]\n", "demonstrations",
     ["too many: 65 (at most 64)"]),
    ("name: t\nkind: classify\nlabels: [" + ", ".join(f"l{i}" for i in range(1001)) + "]\n", "labels",
     ["too many: 1001 (at most 1000)"]),
    ("name: t\nkind: classify\nlabels: [a, %s]\n" % ("b" * 257), "labels[1]", ["too long: 257 characters"]),
    ("name: t\nvideo: {fps: 0}\n", "video.fps", ["> 0"]),
    ("name: t\nvideo: {frames: 8}\n", "video.frames", ["unknown key", "did you mean 'num_frames'"]),
    ("name: t\nkind: classify\n", "labels", ["missing required field"]),
    ("name: t\nkind: classify\nlabels: []\n", "labels", ["at least one label"]),
    ("name: t\nkind: classify\nlabels: cat\n", "labels", ["must be a list"]),
    ("name: t\nkind: classify\nlabels: [cat, dog, cat]\n", "labels[2]", ["duplicate label 'cat'", "labels[0]"]),
    ("name: t\nkind: classify\nlabels: [cat, '']\n", "labels[1]", ["must not be empty"]),
    ("name: t\nkind: classify\nlabels: [yes, maybe]\n", "labels[0]", ["must be a string", "true", "quote"]),
    ("name: t\nlabels: [cat, dog]\n", "labels", ["only classify tasks have labels"]),
    ("name: t\nquery: '<image>Q:'\n", "query", ["must not contain '<image>'"]),
    ("name: t\ninstruction: 'a<|endofchunk|>'\n", "instruction", ["must not contain '<|endofchunk|>'"]),
    ("name: t\noutput_column: Has Space\n", "output_column", ["must match"]),
    ("name: t\ndemonstrations: demos/a.png\n", "demonstrations", ["must be a list"]),
    ("name: t\ndemonstrations: [demos/a.png]\n", "demonstrations[0]", ["must be a mapping", "media, text"]),
    ("name: t\ndemonstrations: [{media: demos/a.png}]\n", "demonstrations[0].text", ["missing required field"]),
    ("name: t\ndemonstrations: [{text: x}]\n", "demonstrations[0].media", ["missing required field"]),
    ("name: t\ndemonstrations: [{media: demos/a.png, text: x, caption: y}]\n", "demonstrations[0].caption",
     ["unknown key"]),
    ("name: t\ndemonstrations: [{media: demos/missing.png, text: x}]\n", "demonstrations[0].media",
     ["file not found", "demos/missing.png"]),
    ("name: t\ndemonstrations: [{media: \"demos/a\\0.png\", text: x}]\n", "demonstrations[0].media",
     ["must not contain a NUL character"]),
    ("name: t\ndemonstrations: [{media: ../outside.png, text: x}]\n", "demonstrations[0].media",
     ["resolves outside the task's folder", "../outside.png ->"]),
    ("name: t\ndemonstrations: [{media: demos/../../outside.png, text: x}]\n", "demonstrations[0].media",
     ["resolves outside the task's folder"]),
    ("name: t\ndemonstrations: [{media: 'http://example.com/a.png', text: x}]\n", "demonstrations[0].media",
     ["http(s):// media are not supported; copy it to the task's folder or s3://"]),
    ("name: t\ndemonstrations: [{media: 'HTTPS://example.com/a.png', text: x}]\n", "demonstrations[0].media",
     ["http(s):// media are not supported"]),
    ("name: t\ndemonstrations: [{media: 'gs://bucket/a.png', text: x}]\n", "demonstrations[0].media",
     ["unsupported scheme 'gs://'", "s3://"]),
    ("name: t\ndemonstrations: [{media: demos/a.png, text: x}, {media: demos/a.png, text: 'y<image>'}]\n",
     "demonstrations[1].text", ["must not contain '<image>'"]),
]


@pytest.mark.parametrize("content, field, words", BAD_FILES, ids=[case[1] for case in BAD_FILES])
def test_each_kind_of_bad_file_is_rejected_with_file_field_and_problem(
        task_dir: Path, content: str, field: str, words: list[str]) -> None:
    path = write(task_dir, content, "bad.yaml")
    problem = only_problem(path)
    assert problem.file == str(path) and problem.field == field
    line = str(problem)
    assert line.startswith(f"{path}: {field}: ")
    for word in words:
        assert word in line


def test_unsupported_media_extension(task_dir: Path) -> None:
    (task_dir / "demos" / "notes.txt").write_text("x")
    problem = only_problem(write(task_dir, "name: t\ndemonstrations: [{media: demos/notes.txt, text: x}]\n"))
    assert problem.field == "demonstrations[0].media"
    assert "unsupported media type (.txt)" in problem.message and ".png" in problem.message


def test_missing_file(tmp_path: Path) -> None:
    problem = only_problem(tmp_path / "nope.yaml")
    assert str(problem) == f"{tmp_path / 'nope.yaml'}: file not found"


@pytest.mark.parametrize("content, words", [
    ("name: t\nkind: [generate\n", ["invalid YAML", "line 3"]),
    ("name: t\ngeneration: {num_beams: %s}\n" % ("9" * 5000), ["invalid YAML", "4300 digits"]),
    ("name: t\nquery: 2024-13-01\n", ["invalid YAML", "month must be in 1..12"]),
    ("name: t\n  bad indent: 1\n", ["invalid YAML", "line 2"]),
    ("", ["empty"]),
    ("- name: t\n", ["must be a mapping", "a list"]),
    ("just text\n", ["must be a mapping", "str 'just text'"]),
])
def test_unreadable_documents(tmp_path: Path, content: str, words: list[str]) -> None:
    path = write(tmp_path, content)
    line = str(only_problem(path))
    assert line.startswith(f"{path}: ")
    for word in words:
        assert word in line


def test_python_tags_are_rejected_not_executed(tmp_path: Path) -> None:
    marker = tmp_path / "executed"
    path = write(tmp_path, f"""
        name: t
        query: !!python/object/apply:pathlib.Path.touch [!!python/object/apply:pathlib.Path ["{marker}"]]
    """)
    problem = only_problem(path)
    assert "invalid YAML" in problem.message and "python/object/apply" in problem.message
    assert not marker.exists()


def test_all_problems_of_a_file_are_reported_together(task_dir: Path) -> None:
    path = write(task_dir, """
        name: Bad
        kind: classify
        labels: [a, a]
        demonstrations:
          - media: demos/none.png
            text: a
        generation: {num_beams: 0, temprature: 2}
    """)
    fields = [p.field for p in problems_of(path)]
    assert sorted(fields) == sorted(["name", "labels[1]", "demonstrations[0].media", "generation.num_beams",
                                     "generation.temprature"])


def test_bounds_are_inclusive(tmp_path: Path) -> None:
    task = load_task(write(tmp_path, f"""
        name: {"n" * 64}
        generation: {{max_new_tokens: 1024, num_beams: 16, top_k: 1000}}
        video: {{num_frames: 64}}
        query: {"q" * 10_000}
    """))
    assert task.generation.max_new_tokens == 1024 and task.generation.num_beams == 16 and task.video.num_frames == 64


def test_a_huge_file_is_refused_before_it_is_parsed(tmp_path: Path) -> None:
    path = tmp_path / "task.yaml"
    path.write_text("name: " + "a" * 50 * 1024 * 1024 + "\n")
    started = time.monotonic()
    problem = only_problem(path)
    assert time.monotonic() - started < 2
    assert problem.field == "" and "larger than 1048576 bytes" in problem.message and len(str(problem)) < 300


def test_long_values_are_not_echoed_back(tmp_path: Path) -> None:
    long = "x" * 200_000
    # `? key` is YAML's explicit key: a plain one may be at most 1024 characters long
    path = write(tmp_path, f"name: {long}\nkind: {long}\n? {long}\n: 1\ngeneration: {{num_beams: {long}}}\n")
    problems = {p.field: p.message for p in problems_of(path)}
    assert all(len(f"{field}: {message}") < 300 for field, message in problems.items())
    assert problems["name"] == problems["kind"] == "too long: 200000 characters (at most 64)"
    assert problems["generation.num_beams"] == f"must be an integer, got str '{'x' * 59}... (200002 characters)"
    assert f"{'x' * 60}... (200000 characters)" in problems   # the unknown key, shortened as the field


# --- where demonstration media may be ----------------------------------------------------------------------------

@pytest.fixture
def outside_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid image outside the task's folder: only the path decides whether the task may use it."""
    path = tmp_path_factory.mktemp("elsewhere") / "outside.png"
    shutil.copy(DEMO_IMAGE, path)
    return path


@pytest.mark.parametrize("target", ["/etc/passwd", "outside_png"])
def test_a_symlink_out_of_the_task_folder_is_refused(
        task_dir: Path, outside_png: Path, target: str) -> None:
    (task_dir / "demos" / "link.png").symlink_to(outside_png if target == "outside_png" else target)
    problem = only_problem(write(task_dir, "name: t\ndemonstrations: [{media: demos/link.png, text: x}]\n"))
    assert problem.field == "demonstrations[0].media"
    assert problem.message.startswith("resolves outside the task's folder (demos/link.png -> ")
    assert str(task_dir) in problem.message


def test_a_relative_path_out_of_the_task_folder_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "task"
    folder.mkdir()
    shutil.copy(DEMO_IMAGE, tmp_path / "outside.png")
    problem = only_problem(write(folder, "name: t\ndemonstrations: [{media: ../outside.png, text: x}]\n"))
    assert str(problem) == (f"{folder / 'task.yaml'}: demonstrations[0].media: resolves outside the task's folder "
                            f"(../outside.png -> {tmp_path / 'outside.png'}; relative paths must stay inside "
                            f"{folder}; give an absolute path or s3:// to mean it)")


def test_absolute_paths_and_symlinks_within_the_folder_are_allowed(task_dir: Path, outside_png: Path) -> None:
    (task_dir / "demos" / "link.png").symlink_to(task_dir / "demos" / "a.png")
    task = load_task(write(task_dir, f"""
        name: t
        demonstrations: [{{media: "{outside_png}", text: x}}, {{media: demos/link.png, text: y}}]
    """))
    assert [d.media for d in task.demonstrations] == [str(outside_png), str(task_dir / "demos" / "a.png")]


# --- demonstration media are decoded as the job decodes them -----------------------------------------------------

@pytest.mark.parametrize("content", [CORRUPT_PNG, DEMO_IMAGE.read_bytes()[:100], b""],
                         ids=["random-bytes", "truncated", "empty"])
def test_a_demonstration_that_does_not_decode_is_refused(task_dir: Path, content: bytes) -> None:
    (task_dir / "demos" / "corrupt.png").write_bytes(content)
    path = write(task_dir, """
        name: t
        demonstrations: [{media: demos/a.png, text: x}, {media: demos/corrupt.png, text: y}]
    """)
    problem = only_problem(path, check_remote_media=False)   # local media are always decoded
    assert problem.field == "demonstrations[1].media"
    assert problem.message.startswith("cannot decode image: ")


def test_a_demonstration_larger_than_an_item_may_be_is_refused_unread(task_dir: Path) -> None:
    from media.files import DEFAULT_MAX_ITEM_BYTES

    with open(task_dir / "demos" / "huge.png", "wb") as sparse:
        sparse.truncate(DEFAULT_MAX_ITEM_BYTES + 1)
    problem = only_problem(write(task_dir, "name: t\ndemonstrations: [{media: demos/huge.png, text: x}]\n"))
    assert problem.field == "demonstrations[0].media"
    limit = DEFAULT_MAX_ITEM_BYTES
    assert problem.message == f"{limit + 1} bytes, more than the {limit} an item may have"


def test_a_video_that_does_not_decode_is_refused(task_dir: Path) -> None:
    (task_dir / "demos" / "clip.mp4").write_bytes(video_bytes()[:300])
    problem = only_problem(write(task_dir, "name: t\ndemonstrations: [{media: demos/clip.mp4, text: x}]\n"))
    assert problem.field == "demonstrations[0].media" and problem.message.startswith("cannot decode video: ")


def test_video_demonstrations_decode_with_the_task_settings_and_must_match_in_frames(task_dir: Path) -> None:
    (task_dir / "demos" / "clip.mp4").write_bytes(video_bytes(num_frames=12))
    clips = load_task(write(task_dir, """
        name: t
        demonstrations: [{media: demos/clip.mp4, text: x}, {media: demos/clip.mp4, text: y}]
        video: {num_frames: 4}
    """))
    assert [d.media_type for d in clips.demonstrations] == ["video", "video"]
    problem = only_problem(write(task_dir, """
        name: t
        demonstrations: [{media: demos/a.png, text: x}, {media: demos/clip.mp4, text: y}]
        video: {num_frames: 4}
    """))
    assert problem.field == "demonstrations"
    assert problem.message.endswith("got demonstrations[0]: 1, demonstrations[1]: 4")


def test_a_demonstration_that_crashes_the_decoder_is_a_problem_not_a_crash(task_dir: Path) -> None:
    from faulty_media import crashing_mp4

    (task_dir / "demos" / "crash.mp4").write_bytes(crashing_mp4())
    path = write(task_dir, "name: t\ndemonstrations: [{media: demos/crash.mp4, text: x}]\n")
    problem = only_problem(path)
    assert problem.field == "demonstrations[0].media"
    assert problem.message == "decoder crashed: signal 11 (SIGSEGV)"
    result = CliRunner().invoke(main, ["validate", str(path)])   # the command reports it and ends as usual
    assert result.exit_code == 2, result.output
    assert f"{path}: demonstrations[0].media: decoder crashed: signal 11 (SIGSEGV)" in result.output


# --- through the command line ------------------------------------------------------------------------------------

def test_validate_command_accepts_the_examples() -> None:
    result = CliRunner().invoke(main, ["validate", *map(str, EXAMPLES)])
    assert result.exit_code == 0, result.output
    assert result.output.count("ok  ") == len(EXAMPLES)


def test_validate_command_lists_every_problem_and_exits_2(task_dir: Path) -> None:
    (task_dir / "demos" / "corrupt.png").write_bytes(CORRUPT_PNG)
    (task_dir / "demos" / "passwd.png").symlink_to("/etc/passwd")
    path = write(task_dir, """
        name: t
        demonstrations:
          - {media: demos/corrupt.png, text: x}
          - {media: demos/passwd.png, text: x}
          - {media: "http://example.com/a.png", text: x}
        generation: {max_new_tokens: 1000000000, num_beams: 100000}
    """)
    result = CliRunner().invoke(main, ["validate", str(path), str(EXAMPLES[0])])
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "5 problems in task files:" in result.output
    for line in ["generation.max_new_tokens: must be <= 1024", "generation.num_beams: must be <= 16",
                 "demonstrations[0].media: cannot decode image: ",
                 "demonstrations[1].media: resolves outside the task's folder (demos/passwd.png -> /etc/passwd;",
                 "demonstrations[2].media: http(s):// media are not supported; copy it to the task's folder or s3://"]:
        assert f"{path}: {line}" in result.output
    assert f"ok  {EXAMPLES[0].stem}" in result.output


# --- remote demonstration media ----------------------------------------------------------------------------------

def test_remote_media_is_checked_on_s3(tmp_path: Path, s3) -> None:
    bucket = s3.new_bucket()
    s3.upload(bucket, {"demos/red.png": DEMO_IMAGE.read_bytes()})
    ok = write(tmp_path, f"name: t\ndemonstrations: [{{media: 's3://{bucket}/demos/red.png', text: x}}]\n", "ok.yaml")
    assert load_task(ok, storage_options=s3.storage_options).demonstrations[0].media == f"s3://{bucket}/demos/red.png"
    missing = write(tmp_path, f"name: t\ndemonstrations: [{{media: 's3://{bucket}/demos/gone.png', text: x}}]\n")
    problem = only_problem(missing, storage_options=s3.storage_options)
    assert problem.field == "demonstrations[0].media" and f"not found: s3://{bucket}/demos/gone.png" in str(problem)
    assert load_task(missing, check_remote_media=False).demonstrations[0].media == f"s3://{bucket}/demos/gone.png"


def test_remote_media_that_cannot_be_read_from_here_is_a_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write(tmp_path, "name: t\ndemonstrations: [{media: 's3://b/x.png', text: x}]\n")
    unreachable = {"endpoint_url": "http://127.0.0.1:9", "key": "k", "secret": "s",
                   "config_kwargs": {"retries": {"max_attempts": 1}}}
    with caplog.at_level(logging.WARNING, logger="pipeline.task"):
        task = load_task(path, storage_options=unreachable)
    assert task.demonstrations[0].media == "s3://b/x.png"
    assert "could not read s3://b/x.png to check it" in caplog.text


def test_remote_media_are_decoded_too(tmp_path: Path, s3) -> None:
    bucket = s3.new_bucket()
    s3.upload(bucket, {"demos/corrupt.png": CORRUPT_PNG})
    path = write(tmp_path, f"name: t\ndemonstrations: [{{media: 's3://{bucket}/demos/corrupt.png', text: x}}]\n")
    problem = only_problem(path, storage_options=s3.storage_options)
    assert problem.field == "demonstrations[0].media" and problem.message.startswith("cannot decode image: ")
    assert load_task(path, check_remote_media=False).demonstrations[0].media == f"s3://{bucket}/demos/corrupt.png"


# --- several files -----------------------------------------------------------------------------------------------

def test_load_tasks_rejects_duplicate_names_and_output_columns(tmp_path: Path) -> None:
    first = write(tmp_path, "name: same\n", "first.yaml")
    second = write(tmp_path, "name: same\n", "second.yaml")
    third = write(tmp_path, "name: other\noutput_column: same\n", "third.yaml")
    with pytest.raises(TaskError) as raised:
        load_tasks([first, second, third])
    assert [(p.file, p.field) for p in raised.value.problems] == [(str(second), "name"),
                                                                  (str(third), "output_column")]
    assert "duplicate task name 'same'" in str(raised.value) and str(first.resolve()) in str(raised.value)


def test_check_tasks_returns_the_good_tasks_and_the_problems_of_all_files(tmp_path: Path) -> None:
    good = write(tmp_path, "name: good\n", "good.yaml")
    bad_one = write(tmp_path, "name: x\nkind: nope\n", "bad1.yaml")
    bad_two = write(tmp_path, "name: [x]\n", "bad2.yaml")
    tasks, problems = check_tasks([bad_one, good, bad_two])
    assert [t.name for t in tasks] == ["good"]
    assert [p.file for p in problems] == [str(bad_one), str(bad_two)]


def test_validate_warns_of_classify_demonstrations_that_are_not_labels(tmp_path: Path) -> None:
    """A warning, not an error (exit 0), compared verbatim as the labels are scored."""
    shutil.copy(DEMO_IMAGE, tmp_path / "a.png")
    path = write(tmp_path, """\
        name: yn
        kind: classify
        demonstrations:
          - {media: a.png, text: " yes"}
          - {media: a.png, text: " nope"}
          - {media: a.png, text: "No"}
        query: " Answer:"
        labels: [" yes", " no"]
        """)
    result = CliRunner().invoke(main, ["validate", str(path), str(JOBS / "tasks" / "count.yaml")])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("Warning:")]
    assert len(warnings) == 2, result.output
    assert warnings[0].startswith(f"Warning: {path}: demonstrations[1].text: ' nope' is not one of the labels")
    assert warnings[1].startswith(f"Warning: {path}: demonstrations[2].text: 'No' is not a label as written: "
                                  "the label is ' no'")
    generate = write(tmp_path, "name: g\ndemonstrations: [{media: a.png, text: anything}]\n", "g.yaml")
    assert load_task(generate).warnings() == ()
