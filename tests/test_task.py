"""Task files: loading, validation messages, hashing and prompt rendering (pipeline/task.py)."""

from __future__ import annotations

import logging
import shutil
import textwrap
from pathlib import Path

import pytest

from flamingo.tokens import END_OF_CHUNK_TOKEN, MEDIA_TOKEN
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
        assert 2 <= len(task.demonstrations) <= 4
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


def test_remote_media_that_cannot_be_checked_is_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write(tmp_path, "name: t\ndemonstrations: [{media: 'nosuchprotocol://b/x.png', text: x}]\n")
    with caplog.at_level(logging.WARNING, logger="pipeline.task"):
        task = load_task(path)
    assert task.demonstrations[0].media == "nosuchprotocol://b/x.png"
    assert "could not check that nosuchprotocol://b/x.png exists" in caplog.text


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
