"""Task files: one YAML file describes one annotation task as a few-shot prompt for Flamingo.

    name: caption                 # required; [a-z0-9_-]+, at most 64 characters; names the task in the output
    kind: generate                # generate (open-ended text, the default) | classify (pick one of `labels`)
    instruction: ""               # text placed verbatim before the demonstrations
    demonstrations:               # few-shot examples in prompt order (at most 64); may be left out (zero-shot)
      - media: demos/red_circle.png   # image or video: relative to this file (inside its folder), absolute, s3://
        text: "A red circle on a white background."
    query: "Output:"              # text after every <image> and before the answer
    labels: [circle, square]      # classify only (and required there): candidate answers, non-empty, unique
    calibrate: false              # classify only: contextual calibration of the labels (flamingo/calibration.py)
    generation:                   # decoding; every key optional
      max_new_tokens: 20          # 1 to 1024
      num_beams: 1                # 1 to 16
      do_sample: false
      temperature: 1.0            # > 0, used when sampling
      top_k: 0                    # 0 to 1000, 0 = off
      top_p: 1.0                  # in (0, 1]
      length_normalize: true      # classify: rank labels by mean instead of total token log-probability
    video: {num_frames: 8, fps: null}  # frames per video item / demonstration (1 to 64): evenly spaced, or at `fps`
    output_column: caption        # the task's column in the `items` query view (pipeline/query.py); default: name

The prompt follows OpenFlamingo: `instruction`, then `<image>{query}{text}<|endofchunk|>` per demonstration,
then `<image>{query}` for the item, which the model continues (generate) or which is scored against each
`{label}<|endofchunk|>` (classify). Text is joined verbatim, so put spaces where you want them (the
annotation written for a classify item is its label without surrounding spaces).

All validation happens in `load_task`, before any work starts: whatever would make the job fail after Ray has
started is caught here. Every problem of a file is collected and raised together as one `TaskError` naming the
file, the field (dotted path, e.g. `demonstrations[2].media`) and the problem. YAML is read with `yaml.safe_load`
only: tags such as `!!python/object` are rejected. Values are bounded (see the MAX_* constants) and demonstration
media are read and decoded exactly as the job will decode them.
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import re
import typing
from collections.abc import Iterable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field, fields
from pathlib import Path, PurePosixPath
from types import NoneType
from typing import Any, NamedTuple
from urllib.parse import urlparse

import yaml

from flamingo.tokens import END_OF_CHUNK_TOKEN, MEDIA_TOKEN
from media.formats import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, media_kind

if typing.TYPE_CHECKING:  # imported when a task has media to decode
    from media.isolation import IsolatedDecoder

log = logging.getLogger(__name__)

KINDS = ("generate", "classify")
TOP_LEVEL_KEYS = ("name", "kind", "instruction", "demonstrations", "query", "labels", "calibrate", "generation",
                  "video", "output_column")
DEMONSTRATION_KEYS = ("media", "text")
_NAME_PATTERN = re.compile(r"[a-z0-9_-]+")
# A float written with an exponent but without a dot (1e9, 1e-3): YAML 1.1, which PyYAML reads, takes it as text.
_EXPONENT_WITHOUT_DOT = re.compile(r"[-+]?[0-9]+[eE][-+]?[0-9]+")

# Bounds. Each keeps a typo (an extra zero, a pasted file) from reaching the model, where it would fail every
# row, or exhaust memory, only after the job has started.
# Read before parsing: PyYAML is pure Python (about a second per MiB), and no prompt a model takes comes near this.
MAX_FILE_BYTES = 1024 * 1024
# Names and output columns become Parquet values and a column of the `items` query view.
MAX_NAME_LENGTH = 64
# instruction, query and each demonstration's text. OpenFlamingo's LMs read 2,048 tokens (~8,000 characters of
# English) in all, images included, so a longer single text is a mistake.
MAX_TEXT_LENGTH = 10_000
# Linux's PATH_MAX; S3 keys are at most 1,024 bytes.
MAX_MEDIA_LENGTH = 4096
# Each demonstration adds an image's visual tokens and its text to the prefix, which must fit the LM's context.
MAX_DEMONSTRATIONS = 64
# classify scores every label for every item: the cost grows with their number and length.
MAX_LABELS = 1000
MAX_LABEL_LENGTH = 256
# The KV cache is allocated for prompt + max_new_tokens up front, for every item and beam of a batch; and the
# LMs' context (2,048 tokens) has to hold the prompt as well.
MAX_NEW_TOKENS = 1024
# Beams multiply the batch (128 items x 16 beams = 2,048 sequences in the KV cache already).
MAX_BEAMS = 16
# Sampling from the k likeliest tokens; past a few hundred this is the same as turning it off (0).
MAX_TOP_K = 1000
# Every frame is decoded and resized for every video item; the models here learn embeddings for 8.
MAX_FRAMES = 64
# How much of a value a message shows, so that a pasted file is not echoed back.
_SHOWN_CHARACTERS = 60


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
    calibrate: bool = False             # classify: answer argmax of the labels' calibrated probabilities
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

    def warnings(self) -> tuple[Problem, ...]:
        """What is allowed but likely a mistake: a classify demonstration whose text is not one of the labels.

        Compared as the scorer compares, verbatim: the prompt shows `{query}{text}<|endofchunk|>` for each
        demonstration and scores `{query}{label}<|endofchunk|>` for the item, so " two" and "two" (or " Two")
        are different answers to the model even though the annotation written is the stripped label."""
        if self.kind != "classify":
            return ()
        loose = {label.strip().casefold(): label for label in self.labels}
        found = []
        for i, demo in enumerate(self.demonstrations):
            if demo.text in self.labels:
                continue
            near = loose.get(demo.text.strip().casefold())
            if near is not None:
                why = (f"is not a label as written: the label is {near!r}; the model sees demonstration texts and "
                       "scores labels verbatim, spaces and case included")
            else:
                why = (f"is not one of the labels ({_shorten(', '.join(map(repr, self.labels)))}): the demonstrations "
                       "show the model answers it cannot give")
            found.append(Problem(self.path, f"demonstrations[{i}].text", f"{_show(demo.text)} {why}"))
        return tuple(found)


def media_type(path_or_uri: str) -> str | None:
    """'image' or 'video' by file extension, None when unsupported."""
    return media_kind(PurePosixPath(urlparse(path_or_uri).path if is_uri(path_or_uri) else path_or_uri).suffix)


def load_task(path: str | Path, *, check_remote_media: bool = True,
              storage_options: Mapping[str, Any] | None = None) -> Task:
    """Read and validate one task file; raise TaskError listing every problem in it.

    Demonstration media are read and decoded as the job will do it, so that a corrupt one is found now and not
    after the cluster has started. Remote ones (s3://...) are read with fsspec, using `storage_options`
    (endpoint_url, key, ...), unless `check_remote_media` is False; a read that cannot happen (no credentials,
    unreachable) only logs a warning, since the job's workers may well have access."""
    file = str(path)
    try:
        with open(path, "rb") as stream:
            raw = stream.read(MAX_FILE_BYTES + 1)  # bounded: the path may name a huge file or a device
    except FileNotFoundError:
        raise TaskError([Problem(file, "", "file not found")]) from None
    except OSError as error:
        raise TaskError([Problem(file, "", f"cannot read: {error.strerror or error}")]) from None
    if len(raw) > MAX_FILE_BYTES:
        raise TaskError([Problem(file, "", f"file is larger than {MAX_FILE_BYTES} bytes; a task file is a short "
                                           "prompt, with its media in files of their own")])
    try:
        data = yaml.safe_load(raw)
    except (yaml.YAMLError, ValueError) as error:  # ValueError: a date 2024-13-01, an integer of 5,000 digits
        message = _yaml_message(error) if isinstance(error, yaml.YAMLError) else str(error)
        raise TaskError([Problem(file, "", f"invalid YAML: {message}")]) from None

    check = _Checker(file)
    resolved = Path(path).resolve()
    if data is None:
        raise TaskError([Problem(file, "", "file is empty; a task needs at least a `name`")])
    doc = check.mapping(data, "", TOP_LEVEL_KEYS)
    if not isinstance(data, dict):  # nothing further to check
        raise TaskError(check.problems)
    name = check.string(doc, "name", max_length=MAX_NAME_LENGTH, required=True)
    if name is not None and not _NAME_PATTERN.fullmatch(name):
        check.problem("name", f"{_show(name)} must match [a-z0-9_-]+ (lowercase letters, digits, '_' and '-')")
    kind = check.string(doc, "kind", max_length=MAX_NAME_LENGTH)
    if kind is None:
        kind = "generate"
    elif kind not in KINDS:
        check.problem("kind", f"unknown kind {_show(kind)}{_suggestion(kind, KINDS)}; "
                              f"expected one of: {', '.join(KINDS)}")
    output_column = check.string(doc, "output_column", max_length=MAX_NAME_LENGTH)
    if output_column is not None and not _NAME_PATTERN.fullmatch(output_column):
        check.problem("output_column", f"{_show(output_column)} must match [a-z0-9_-]+")
    generation = check.options(doc.get("generation"), "generation", GenerationOptions)
    video = check.options(doc.get("video"), "video", VideoOptions)
    _check_ranges(check, generation, video)
    demonstrations = _demonstrations(check, doc.get("demonstrations"), resolved.parent)
    # Demonstrations are decoded with the task's video settings, or the defaults where those are wrong.
    decode_video = VideoOptions() if check.has_problem_under("video") else video
    _check_media(check, demonstrations, decode_video, check_remote_media, storage_options or {})
    task = Task(
        name=name or "",
        kind=kind,
        path=str(resolved),
        sha256=hashlib.sha256(raw).hexdigest(),
        output_column=output_column or name or "",
        instruction=check.prompt_text(doc, "instruction"),
        demonstrations=tuple(demo for _, demo in demonstrations),
        query=check.prompt_text(doc, "query"),
        labels=_labels(check, doc.get("labels"), kind),
        calibrate=_calibrate(check, doc.get("calibrate"), kind),
        generation=generation,
        video=video,
    )
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

    def has_problem_under(self, field_path: str) -> bool:
        """Whether a problem was found in the field or in any field inside it."""
        return any(p.field == field_path or p.field.startswith((f"{field_path}.", f"{field_path}["))
                   for p in self.problems)

    def mapping(self, value: Any, field_path: str, keys: Iterable[str]) -> dict[str, Any]:
        """The value's known keys; reports a value that is no mapping and each unknown key."""
        keys = tuple(keys)
        if not isinstance(value, dict):
            self.problem(field_path, f"must be a mapping (keys: {', '.join(keys)}), got {_describe(value)}")
            return {}
        for key in value:
            if key not in keys:
                shown = _shorten(str(key))
                self.problem(_join(field_path, shown),
                             f"unknown key{_suggestion(shown, keys)}; valid keys: {', '.join(keys)}")
        return {key: item for key, item in value.items() if key in keys}

    def typed(self, value: Any, field_path: str, expected: type) -> bool:
        if _is_instance(value, expected):
            return True
        hint = _number_hint(value, expected)
        self.problem(field_path, f"must be {_TYPE_NAMES[expected]}, got {_describe(value)}{hint}")
        return False

    def string(self, doc: Mapping[str, Any], key: str, field_path: str | None = None, *, max_length: int,
               required: bool = False) -> str | None:
        """A string field of at most `max_length` characters; None when missing, null or wrong (reported)."""
        field_path = field_path or key
        value = doc.get(key)
        if value is None:
            if required:
                self.problem(field_path, "missing required field")
            return None
        if not self.typed(value, field_path, str):
            return None
        if len(value) > max_length:
            self.problem(field_path, f"too long: {len(value)} characters (at most {max_length})")
            return None
        return value

    def prompt_text(self, doc: Mapping[str, Any], key: str, field_path: str | None = None, *,
                    required: bool = False) -> str:
        """A string that goes into the prompt."""
        field_path = field_path or key
        text = self.string(doc, key, field_path, max_length=MAX_TEXT_LENGTH, required=required) or ""
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
        kwargs: dict[str, Any] = {}
        for key, item in self.mapping(value, field_path, [f.name for f in fields(cls)]).items():
            expected, optional = _unwrap_optional(hints[key])
            if item is None and optional:
                kwargs[key] = None
            elif self.typed(item, _join(field_path, key), expected):
                kwargs[key] = float(item) if expected is float else item
        return cls(**kwargs)


def _demonstrations(check: _Checker, value: Any, base_dir: Path) -> list[tuple[str, Demonstration]]:
    """Each demonstration with the field path of its media (`demonstrations[i].media`), media resolved. Media
    that cannot be used are reported here, and `_check_media` then leaves them alone."""
    if value is None or not check.typed(value, "demonstrations", list):
        return []
    if len(value) > MAX_DEMONSTRATIONS:
        check.problem("demonstrations", f"too many: {len(value)} (at most {MAX_DEMONSTRATIONS})")
        return []
    demos = []
    for i, item in enumerate(value):
        where = f"demonstrations[{i}]"
        doc = check.mapping(item, where, DEMONSTRATION_KEYS)
        if not isinstance(item, dict):
            continue
        media = check.string(doc, "media", f"{where}.media", max_length=MAX_MEDIA_LENGTH, required=True)
        text = check.prompt_text(doc, "text", f"{where}.text", required=True)
        if media is None:
            continue
        resolved = _resolve_media(check, f"{where}.media", media, base_dir)
        if resolved is not None and media_type(resolved) is None:
            suffix = PurePosixPath(media).suffix or "no extension"
            check.problem(f"{where}.media", f"unsupported media type ({suffix}): {media}; expected an image "
                                            f"({', '.join('.' + e for e in sorted(IMAGE_EXTENSIONS))}) or a video "
                                            f"({', '.join('.' + e for e in sorted(VIDEO_EXTENSIONS))})")
        demos.append((f"{where}.media", Demonstration(media=resolved or media, text=text)))
    return demos


def _resolve_media(check: _Checker, field_path: str, media: str, base_dir: Path) -> str | None:
    """An absolute local path or an s3:// URI for `media`, or None (and a problem) when it cannot be used.

    Relative paths are resolved against the task file's folder, symlinks included, and must stay inside it: a
    task file and its folder can be handed around, and a relative path should not reach the rest of the machine
    (`../../etc/...`, or a symlink in the folder). An absolute path or an s3:// URI says plainly where it
    points, so those are allowed. Other schemes are refused here: the job reads media with fsspec, which would
    fetch http:// from wherever the workers run."""
    if "\0" in media:
        check.problem(field_path, "must not contain a NUL character")
        return None
    if media.startswith("file://"):
        return urlparse(media).path
    if is_uri(media):
        scheme = media.split("://", 1)[0].lower()
        if scheme == "s3":
            return media
        if scheme in ("http", "https"):
            check.problem(field_path, "http(s):// media are not supported; copy it to the task's folder or s3://")
        else:
            check.problem(field_path, f"unsupported scheme {_show(scheme + '://')}: demonstration media are paths "
                                      "(relative to the task file, or absolute) or s3:// URIs")
        return None
    path = Path(media).expanduser()
    if path.is_absolute():
        return str(path)
    resolved = (base_dir / path).resolve()
    if not resolved.is_relative_to(base_dir):
        check.problem(field_path, f"resolves outside the task's folder ({media} -> {resolved}; relative paths "
                                  f"must stay inside {base_dir}; give an absolute path or s3:// to mean it)")
        return None
    return str(resolved)


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
    if len(value) > MAX_LABELS:
        check.problem("labels", f"too many: {len(value)} (at most {MAX_LABELS})")
        return ()
    labels: list[str] = []
    first_index: dict[str, int] = {}
    for i, label in enumerate(value):
        where = f"labels[{i}]"
        if not check.typed(label, where, str):
            continue
        if not label.strip():
            check.problem(where, "must not be empty")
        elif len(label) > MAX_LABEL_LENGTH:
            check.problem(where, f"too long: {len(label)} characters (at most {MAX_LABEL_LENGTH})")
        elif label in first_index:
            check.problem(where, f"duplicate label {label!r} (same as labels[{first_index[label]}])")
        else:
            check.no_markers(label, where)
            first_index[label] = i
            labels.append(label)
    return tuple(labels)


def _calibrate(check: _Checker, value: Any, kind: str) -> bool:
    if value is None or not check.typed(value, "calibrate", bool):
        return False
    if value and kind != "classify":
        check.problem("calibrate", f"only classify tasks are calibrated (their labels' probabilities are); this "
                                   f"task's kind is {kind!r}")
        return False
    return bool(value)


def _check_ranges(check: _Checker, gen: GenerationOptions, video: VideoOptions) -> None:
    """Range checks of the generation and video sections. An upper bound's message says why it is there (the
    MAX_* comments say more), so that the fix is plain."""
    for field_path, value, low, high, why in (
        ("generation.max_new_tokens", gen.max_new_tokens, 1, MAX_NEW_TOKENS, "the context holds the prompt too"),
        ("generation.num_beams", gen.num_beams, 1, MAX_BEAMS, "each beam is one more sequence in memory"),
        ("generation.top_k", gen.top_k, 0, MAX_TOP_K, "past a few hundred it is the same as 0, off"),
        ("video.num_frames", video.num_frames, 1, MAX_FRAMES, "every frame of every video item is decoded"),
    ):
        if value < low:
            check.problem(field_path, f"must be >= {low}{' (0 turns it off)' if low == 0 else ''}, got {value}")
        elif value > high:
            check.problem(field_path, f"must be <= {high} ({why}), got {_shorten(str(value))}")
    for field_path, ok, rule, number in (
        ("generation.temperature", gen.temperature > 0, "must be > 0", gen.temperature),
        ("generation.top_p", 0 < gen.top_p <= 1, "must be in (0, 1]", gen.top_p),
        ("video.fps", video.fps is None or video.fps > 0, "must be > 0 or null", video.fps),
    ):
        if not ok:
            check.problem(field_path, f"{rule}, got {number}")


def _check_media(check: _Checker, demonstrations: list[tuple[str, Demonstration]], video: VideoOptions,
                 check_remote: bool, storage_options: Mapping[str, Any]) -> None:
    """Read and decode every demonstration whose media field has no problem yet, as the job will.

    The decoders are imported, and their child process started, only when there is something to decode, so
    that loading a task file stays light otherwise. Frames must agree across demonstrations (an image has 1, a
    clip up to `video.num_frames`): the job stacks them into one array."""
    frames: dict[str, int] = {}
    with ExitStack() as stack:  # the decoding child, started at the first media, ends with the loop
        decoder: IsolatedDecoder | None = None
        for field_path, demo in demonstrations:
            if check.has_problem_under(field_path):
                continue
            data = _read_media(check, field_path, demo.media, check_remote, storage_options)
            if data is None:
                continue
            decoder = decoder or stack.enter_context(_decoder(video))
            decoded, error = decoder.decode(demo.media_type, data)
            if error is not None:
                check.problem(field_path, _shorten(error, 500))
            elif decoded is not None:
                frames[field_path.removesuffix(".media")] = len(decoded)
    if len(set(frames.values())) > 1:
        counts = ", ".join(f"{where}: {count}" for where, count in frames.items())
        check.problem("demonstrations", f"must all have the same number of frames (an image has 1, a video up "
                                        f"to video.num_frames); got {counts}")


def _read_media(check: _Checker, field_path: str, media: str, check_remote: bool,
                storage_options: Mapping[str, Any]) -> bytes | None:
    """The media's bytes, or None when there is nothing to decode (a problem is then reported, or logged)."""
    if not is_uri(media):
        return _read_local(check, field_path, Path(media))
    if check_remote:
        return _read_remote(check, field_path, media, storage_options)
    return None


def _read_local(check: _Checker, field_path: str, path: Path) -> bytes | None:
    """Read without fsspec, which would take a '::' in a file name for a chain of URLs."""
    if not path.is_file():
        check.problem(field_path, f"file not found: {path}")
        return None
    try:
        if _fits(check, field_path, path.stat().st_size):
            return path.read_bytes()
    except OSError as error:
        check.problem(field_path, f"cannot read {path}: {error.strerror or error}")
    return None


def _read_remote(check: _Checker, field_path: str, uri: str, storage_options: Mapping[str, Any]) -> bytes | None:
    """A missing object is a problem of the task; any other failure (no credentials, no network) only says that
    it cannot be read from here, while the job's workers may well have access: that is logged."""
    from media.storage import filesystem  # imported on first use (fsspec)

    try:
        fs, key = filesystem(uri, storage_options)
        if _fits(check, field_path, fs.size(key)):
            return bytes(fs.cat_file(key))
    except FileNotFoundError:
        check.problem(field_path, f"not found: {uri}")
    except Exception as error:  # any failure to look is no answer
        log.warning("could not read %s to check it (skipped): %s", uri, error)
    return None


def _fits(check: _Checker, field_path: str, size: int | None) -> bool:
    """Whether media of `size` bytes are within the job's own limit for an item (reported when not)."""
    from media.files import DEFAULT_MAX_ITEM_BYTES  # imported on first use (pyarrow)

    if size is not None and size > DEFAULT_MAX_ITEM_BYTES:
        check.problem(field_path, f"{size} bytes, more than the {DEFAULT_MAX_ITEM_BYTES} an item may have")
        return False
    return True


def _decoder(video: VideoOptions) -> IsolatedDecoder:
    """Decodes as the job does, in a child process: a demonstration that crashes or hangs a native decoder is a
    problem of the task file (`decoder crashed: signal 11 (SIGSEGV)`), not the end of `validate`.

    Only the decoders run (PIL, decord), not the model's resize and normalisation, which cannot fail on a
    picture that decoded: whether media decode does not depend on the model, and `validate` loads no torch.
    The video settings are the task's, as they decide how many frames a clip gives."""
    from media.decode import DecodeConfig
    from media.isolation import IsolatedDecoder

    return IsolatedDecoder(DecodeConfig(num_frames=video.num_frames, fps=video.fps))


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
    return f"{type(value).__name__} {_show(value)}"


def _show(value: Any) -> str:
    """`repr(value)`, cut short when long: messages must not echo a pasted file back."""
    return _shorten(repr(value))


def _shorten(text: str, limit: int = _SHOWN_CHARACTERS) -> str:
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


def _number_hint(value: Any, expected: type) -> str:
    """Why a number the author wrote may have been read as text: YAML 1.1 has no `1e9` without a dot."""
    if expected not in (int, float) or not isinstance(value, str) or not _EXPONENT_WITHOUT_DOT.fullmatch(value):
        return ""
    if expected is int and float(value).is_integer() and abs(float(value)) < 1e18:
        return f" (YAML reads {value} as text, not a number; write it in digits: {int(float(value))})"
    return f" (YAML reads {value} as text, not a number; write a dot and a signed exponent, e.g. 1.0e-3)"


def _yaml_message(error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error)
    context = getattr(error, "context", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{context + ': ' if context else ''}{problem}"
