"""Task files: one YAML file describes one annotation task as a few-shot prompt for Flamingo.

    name: caption                 # required; [a-z0-9_-]+; names the task in the output
    kind: generate                # generate (open-ended text, the default) | classify (pick one of `labels`)
    instruction: ""               # text placed verbatim before the demonstrations
    demonstrations:               # few-shot examples in prompt order; may be left out (zero-shot)
      - media: demos/red_circle.png   # image or video: relative to this file, absolute, or a URI (s3://...)
        text: "A red circle on a white background."
    query: "Output:"              # text after every <image> and before the answer
    labels: [circle, square]      # classify only (and required there): candidate answers, non-empty, unique
    generation:                   # decoding; every key optional
      max_new_tokens: 20          # >= 1
      num_beams: 1                # >= 1
      do_sample: false
      temperature: 1.0            # > 0, used when sampling
      top_k: 0                    # >= 0, 0 = off
      top_p: 1.0                  # in (0, 1]
      length_normalize: true      # classify: rank labels by mean instead of total token log-probability
    video: {num_frames: 8, fps: null}  # frames per video item / demonstration: evenly spaced, or at `fps`
    output_column: caption        # the task's column in the `items` query view (pipeline/query.py); default: name

The prompt follows OpenFlamingo: `instruction`, then `<image>{query}{text}<|endofchunk|>` per demonstration,
then `<image>{query}` for the item, which the model continues (generate) or which is scored against each
`{label}<|endofchunk|>` (classify). Text is joined verbatim, so put spaces where you want them (the
annotation written for a classify item is its label without surrounding spaces).

All validation happens in `load_task`, before any work starts. Every problem of a file is collected and raised
together as one `TaskError` naming the file, the field (dotted path, e.g. `demonstrations[2].media`) and the
problem. YAML is read with `yaml.safe_load` only: tags such as `!!python/object` are rejected.
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import re
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path, PurePosixPath
from types import NoneType
from typing import Any, NamedTuple
from urllib.parse import urlparse

import yaml

from flamingo.tokens import END_OF_CHUNK_TOKEN, MEDIA_TOKEN
from media.formats import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, media_kind

log = logging.getLogger(__name__)

KINDS = ("generate", "classify")
TOP_LEVEL_KEYS = ("name", "kind", "instruction", "demonstrations", "query", "labels", "generation", "video",
                  "output_column")
DEMONSTRATION_KEYS = ("media", "text")
_NAME_PATTERN = re.compile(r"[a-z0-9_-]+")


class Problem(NamedTuple):
    """One thing wrong with a task file. `field` is a dotted path; empty for the file as a whole."""

    file: str
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.field}: {self.message}" if self.field else f"{self.file}: {self.message}"


class TaskError(ValueError):
    """Every problem found in one or more task files, one `file: field: problem` line each."""

    def __init__(self, problems: Iterable[Problem]):
        self.problems = tuple(problems)
        super().__init__("\n".join(map(str, self.problems)))


@dataclass(frozen=True)
class GenerationOptions:
    """How the model decodes (generate) or ranks labels (classify, which uses `length_normalize` only)."""

    max_new_tokens: int = 20
    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    length_normalize: bool = True


@dataclass(frozen=True)
class VideoOptions:
    """How frames are taken from a video: `num_frames` evenly spaced, or at `fps` when given."""

    num_frames: int = 8
    fps: float | None = None


@dataclass(frozen=True)
class Demonstration:
    """One few-shot example. `media` is resolved: an absolute local path or a URI."""

    media: str
    text: str

    @property
    def media_type(self) -> str | None:
        return media_type(self.media)


@dataclass(frozen=True)
class Task:
    """A validated task file. `path` is absolute; `sha256` hashes the file's bytes (not the media it names)."""

    name: str
    kind: str
    path: str
    sha256: str
    output_column: str
    instruction: str = ""
    demonstrations: tuple[Demonstration, ...] = ()
    query: str = ""
    labels: tuple[str, ...] = ()
    generation: GenerationOptions = field(default_factory=GenerationOptions)
    video: VideoOptions = field(default_factory=VideoOptions)

    def prefix_text(self) -> str:
        """The instruction and all demonstrations, one `<image>` per demonstration media, in order."""
        shots = "".join(f"{MEDIA_TOKEN}{self.query}{demo.text}{END_OF_CHUNK_TOKEN}" for demo in self.demonstrations)
        return self.instruction + shots

    def query_text(self) -> str:
        """What follows the prefix for each item; the model's answer continues it."""
        return f"{MEDIA_TOKEN}{self.query}"

    def candidates(self) -> tuple[str, ...]:
        """classify: the continuations of `query_text()` to score, one per label, in label order.

        Each ends with `<|endofchunk|>` as the demonstrations do, so a label that is a prefix of another
        ("cat", "caterpillar") must also be where the model stops."""
        return tuple(f"{label}{END_OF_CHUNK_TOKEN}" for label in self.labels)


def media_type(path_or_uri: str) -> str | None:
    """'image' or 'video' by file extension, None when unsupported."""
    return media_kind(PurePosixPath(urlparse(path_or_uri).path if is_uri(path_or_uri) else path_or_uri).suffix)


def load_task(path: str | Path, *, check_remote_media: bool = True,
              storage_options: Mapping[str, Any] | None = None) -> Task:
    """Read and validate one task file; raise TaskError listing every problem in it.

    Local demonstration media must exist. Remote ones (s3://...) are checked with fsspec, using
    `storage_options` (endpoint_url, key, ...), unless `check_remote_media` is False; a check that cannot run
    (no credentials, unreachable) only logs a warning, since the job's workers may well have access."""
    file = str(path)
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise TaskError([Problem(file, "", "file not found")]) from None
    except OSError as error:
        raise TaskError([Problem(file, "", f"cannot read: {error.strerror or error}")]) from None
    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as error:
        raise TaskError([Problem(file, "", f"invalid YAML: {_yaml_message(error)}")]) from None

    check = _Checker(file)
    resolved = Path(path).resolve()
    if data is None:
        raise TaskError([Problem(file, "", "file is empty; a task needs at least a `name`")])
    doc = check.mapping(data, "", TOP_LEVEL_KEYS)
    if not isinstance(data, dict):  # nothing further to check
        raise TaskError(check.problems)
    name = check.string(doc, "name", required=True)
    if name is not None and not _NAME_PATTERN.fullmatch(name):
        check.problem("name", f"{name!r} must match [a-z0-9_-]+ (lowercase letters, digits, '_' and '-')")
    kind = check.string(doc, "kind", default="generate")
    if kind not in KINDS:
        check.problem("kind", f"unknown kind {kind!r}{_suggestion(kind, KINDS)}; expected one of: {', '.join(KINDS)}")
    output_column = check.string(doc, "output_column")
    if output_column is not None and not _NAME_PATTERN.fullmatch(output_column):
        check.problem("output_column", f"{output_column!r} must match [a-z0-9_-]+")
    task = Task(
        name=name or "",
        kind=kind,
        path=str(resolved),
        sha256=hashlib.sha256(raw).hexdigest(),
        output_column=output_column or name or "",
        instruction=check.prompt_text(doc, "instruction"),
        demonstrations=_demonstrations(check, doc.get("demonstrations"), resolved.parent),
        query=check.prompt_text(doc, "query"),
        labels=_labels(check, doc.get("labels"), kind),
        generation=check.options(doc.get("generation"), "generation", GenerationOptions),
        video=check.options(doc.get("video"), "video", VideoOptions),
    )
    _check_ranges(check, task)
    _check_media_exists(check, task, check_remote_media, storage_options or {})
    if check.problems:
        raise TaskError(check.problems)
    return task


def check_tasks(paths: Iterable[str | Path], **options: Any) -> tuple[tuple[Task, ...], tuple[Problem, ...]]:
    """Load several task files for one run: the valid tasks, and every problem of every file.

    Names (and output columns) must be unique across the run, as they identify a task's rows and column.
    `options` go to `load_task`."""
    tasks: list[Task] = []
    problems: list[Problem] = []
    by_name: dict[str, Task] = {}
    by_column: dict[str, Task] = {}
    for path in paths:
        try:
            task = load_task(path, **options)
        except TaskError as error:
            problems.extend(error.problems)
            continue
        if task.name in by_name:
            problems.append(Problem(str(path), "name", f"duplicate task name {task.name!r} "
                                                       f"(also in {by_name[task.name].path})"))
        elif task.output_column in by_column:
            other = by_column[task.output_column]
            problems.append(Problem(str(path), "output_column", f"duplicate output column {task.output_column!r} "
                                                                f"(also task {other.name!r} in {other.path})"))
        else:
            by_name[task.name] = by_column[task.output_column] = task
            tasks.append(task)
    return tuple(tasks), tuple(problems)


def load_tasks(paths: Iterable[str | Path], **options: Any) -> tuple[Task, ...]:
    """Load the task files of one run, or raise one TaskError with the problems of all of them."""
    tasks, problems = check_tasks(paths, **options)
    if problems:
        raise TaskError(problems)
    return tasks


class _Checker:
    """Reads values out of a parsed file, collecting a Problem (instead of raising) for each one that is wrong."""

    def __init__(self, file: str):
        self.file = file
        self.problems: list[Problem] = []

    def problem(self, field_path: str, message: str) -> None:
        self.problems.append(Problem(self.file, field_path, message))

    def mapping(self, value: Any, field_path: str, keys: Iterable[str]) -> dict[str, Any]:
        """The value's known keys; reports a value that is no mapping and each unknown key."""
        keys = tuple(keys)
        if not isinstance(value, dict):
            self.problem(field_path, f"must be a mapping (keys: {', '.join(keys)}), got {_describe(value)}")
            return {}
        for key in value:
            if key not in keys:
                self.problem(_join(field_path, str(key)),
                             f"unknown key{_suggestion(str(key), keys)}; valid keys: {', '.join(keys)}")
        return {key: item for key, item in value.items() if key in keys}

    def typed(self, value: Any, field_path: str, expected: type) -> bool:
        if _is_instance(value, expected):
            return True
        self.problem(field_path, f"must be {_TYPE_NAMES[expected]}, got {_describe(value)}")
        return False

    def string(self, doc: Mapping[str, Any], key: str, field_path: str | None = None, *,
               default: str | None = None, required: bool = False) -> str | None:
        """A string field; null counts as missing."""
        field_path = field_path or key
        value = doc.get(key)
        if value is None:
            if required:
                self.problem(field_path, "missing required field")
            return default
        return value if self.typed(value, field_path, str) else default

    def prompt_text(self, doc: Mapping[str, Any], key: str, field_path: str | None = None, *,
                    required: bool = False) -> str:
        """A string that goes into the prompt."""
        field_path = field_path or key
        text = self.string(doc, key, field_path, default="", required=required)
        self.no_markers(text, field_path)
        return text

    def no_markers(self, text: str, field_path: str) -> None:
        """Prompt text must not contain the markers the layout places: they would misalign media and text."""
        for marker in (MEDIA_TOKEN, END_OF_CHUNK_TOKEN):
            if marker in text:
                self.problem(field_path, f"must not contain {marker!r}: the prompt layout places it")

    def options(self, value: Any, field_path: str, cls: type) -> Any:
        """A section whose keys, types and defaults are the fields of dataclass `cls`."""
        if value is None:
            return cls()
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for key, item in self.mapping(value, field_path, [f.name for f in fields(cls)]).items():
            expected, optional = _unwrap_optional(hints[key])
            if item is None and optional:
                kwargs[key] = None
            elif self.typed(item, _join(field_path, key), expected):
                kwargs[key] = float(item) if expected is float else item
        return cls(**kwargs)


def _demonstrations(check: _Checker, value: Any, base_dir: Path) -> tuple[Demonstration, ...]:
    if value is None or not check.typed(value, "demonstrations", list):
        return ()
    demos = []
    for i, item in enumerate(value):
        where = f"demonstrations[{i}]"
        doc = check.mapping(item, where, DEMONSTRATION_KEYS)
        if not isinstance(item, dict):
            continue
        media = check.string(doc, "media", f"{where}.media", required=True)
        if media is not None and media_type(media) is None:
            suffix = PurePosixPath(media).suffix or "no extension"
            check.problem(f"{where}.media", f"unsupported media type ({suffix}): {media}; expected an image "
                                            f"({', '.join('.' + e for e in sorted(IMAGE_EXTENSIONS))}) or a video "
                                            f"({', '.join('.' + e for e in sorted(VIDEO_EXTENSIONS))})")
        text = check.prompt_text(doc, "text", f"{where}.text", required=True)
        if media is not None:
            demos.append(Demonstration(media=_resolve_media(media, base_dir), text=text))
    return tuple(demos)


def _labels(check: _Checker, value: Any, kind: str) -> tuple[str, ...]:
    if kind == "generate" and value is not None:
        check.problem("labels", "only classify tasks have labels; this task's kind is 'generate'")
    if kind != "classify":
        return ()
    if value is None:
        check.problem("labels", "missing required field: a classify task needs its candidate labels")
        return ()
    if not check.typed(value, "labels", list):
        return ()
    if not value:
        check.problem("labels", "must list at least one label")
    labels: list[str] = []
    first_index: dict[str, int] = {}
    for i, label in enumerate(value):
        where = f"labels[{i}]"
        if not check.typed(label, where, str):
            continue
        if not label.strip():
            check.problem(where, "must not be empty")
        elif label in first_index:
            check.problem(where, f"duplicate label {label!r} (same as labels[{first_index[label]}])")
        else:
            check.no_markers(label, where)
            first_index[label] = i
            labels.append(label)
    return tuple(labels)


def _check_ranges(check: _Checker, task: Task) -> None:
    gen, video = task.generation, task.video
    for field_path, ok, rule, value in (
        ("generation.max_new_tokens", gen.max_new_tokens >= 1, "must be >= 1", gen.max_new_tokens),
        ("generation.num_beams", gen.num_beams >= 1, "must be >= 1", gen.num_beams),
        ("generation.temperature", gen.temperature > 0, "must be > 0", gen.temperature),
        ("generation.top_k", gen.top_k >= 0, "must be >= 0 (0 turns it off)", gen.top_k),
        ("generation.top_p", 0 < gen.top_p <= 1, "must be in (0, 1]", gen.top_p),
        ("video.num_frames", video.num_frames >= 1, "must be >= 1", video.num_frames),
        ("video.fps", video.fps is None or video.fps > 0, "must be > 0 or null", video.fps),
    ):
        if not ok:
            check.problem(field_path, f"{rule}, got {value}")


def _check_media_exists(check: _Checker, task: Task, check_remote: bool, storage_options: Mapping[str, Any]) -> None:
    for i, demo in enumerate(task.demonstrations):
        where = f"demonstrations[{i}].media"
        if not is_uri(demo.media):
            if not Path(demo.media).is_file():
                check.problem(where, f"file not found: {demo.media}")
        elif check_remote:
            exists = _remote_exists(demo.media, storage_options)
            if exists is False:
                check.problem(where, f"not found: {demo.media}")


def _remote_exists(uri: str, storage_options: Mapping[str, Any]) -> bool | None:
    """Whether the object exists; None when that cannot be checked from here."""
    from media.storage import filesystem  # imported on first use (fsspec): most task files name local media only

    try:
        fs, path = filesystem(uri, storage_options)
        return bool(fs.exists(path))
    except Exception as error:  # any failure to check (no credentials, no network, no such protocol) is not an answer
        log.warning("could not check that %s exists (skipped): %s", uri, error)
        return None


def _resolve_media(media: str, base_dir: Path) -> str:
    """Local paths become absolute (relative ones against the task file's folder); URIs stay as they are."""
    if media.startswith("file://"):
        return urlparse(media).path
    if is_uri(media):
        return media
    path = Path(media).expanduser()
    return str(path if path.is_absolute() else (base_dir / path).resolve())


def is_uri(value: str) -> bool:
    """s3://bucket/key and the like, as opposed to a local path."""
    return "://" in value


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _suggestion(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "a list"}


def _is_instance(value: Any, expected: type) -> bool:
    """isinstance, except that YAML's true/false are not numbers and integers are numbers."""
    if isinstance(value, bool) and expected is not bool:
        return False
    if expected is float:
        return isinstance(value, (int, float))
    return isinstance(value, expected)


def _unwrap_optional(hint: Any) -> tuple[type, bool]:
    args = typing.get_args(hint)
    if NoneType in args:
        return next(arg for arg in args if arg is not NoneType), True
    return hint, False


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"{str(value).lower()} (YAML reads yes/no/on/off/true/false as booleans; quote them for text)"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"{type(value).__name__} {value!r}"


def _yaml_message(error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error)
    context = getattr(error, "context", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{context + ': ' if context else ''}{problem}"
