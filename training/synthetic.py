"""A seeded procedural world of coloured shapes, for training and testing a miniature Flamingo on data it
can make itself (there is no model hub to download one from).

Scenes: 1-3 shapes on a plain grey background, each inside its own cell of a 3x3 grid. Clips: 1-2 shapes
moving left / right / up / down, slowly or fast. A scene or clip is a frozen dataclass holding its ground
truth; it draws itself, writes its caption and asks questions about single attributes from that truth
alone, so evaluation can score attribute-level exact matches. Fast-binding episodes (Frozen,
Tsimpoukelli et al. 2021, as used in the Flamingo paper) bind nonsense words to categories for few-shot
tests.

Everything is a pure function of a seed and parameters: generators take anything
`numpy.random.default_rng` accepts (an int, a sequence of ints, or a Generator to draw from) and no global
random state is used. Drawing itself involves no randomness and no antialiasing, so the same seed gives
byte-identical PNG / mp4 output, and every pixel of an object is exactly its colour's RGB in the PNG.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from itertools import combinations, permutations
from types import MappingProxyType
from typing import Any, ClassVar, Literal, TypeVar

import av
import numpy as np
from PIL import Image, ImageDraw

RGB = tuple[int, int, int]
Seed = int | Sequence[int] | np.random.SeedSequence | np.random.Generator
BindingCategory = Literal["shape", "colour_shape"]
T = TypeVar("T")
BINDING_CATEGORIES: tuple[BindingCategory, ...] = ("shape", "colour_shape")

SHAPES = ("circle", "square", "triangle", "star")
COLOURS: Mapping[str, RGB] = MappingProxyType(
    {
        "red": (220, 40, 40),
        "green": (40, 170, 60),
        "blue": (40, 80, 220),
        "yellow": (235, 210, 40),
        "purple": (150, 60, 190),
    }
)
BACKGROUND: RGB = (128, 128, 128)
# Bounding radius as a fraction of the image side: a large object still fits in a grid cell (1/6).
SIZES: Mapping[str, float] = MappingProxyType({"small": 0.08, "large": 0.14})
GRID = 3
ROWS = ("top", "middle", "bottom")
COLUMNS = ("left", "centre", "right")
# Unit steps in image coordinates (y grows downwards).
DIRECTIONS: Mapping[str, tuple[int, int]] = MappingProxyType(
    {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
)
# Image sides travelled per second.
SPEEDS: Mapping[str, float] = MappingProxyType({"slow": 0.15, "fast": 0.4})
SPEED_ADVERBS: Mapping[str, str] = MappingProxyType({"slow": "slowly", "fast": "quickly"})
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SUPPORT_TEXT = "This is a {word}."
QUERY_TEXT = "This is a"

# Nonsense words are two onset + vowel syllables closed by a coda ("bliket", "dovax"): two syllables
# rarely make an English word, where one ("bat", "gap") often does. Onsets are consonants so "a bliket"
# always has the right article. There is no dictionary check: the model only ever sees this world, so
# a word is nonsense to it as long as the world's own vocabulary never uses it, which the reserved set
# below ensures.
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z",
           "bl", "br", "dr", "fl", "gl", "gr", "kl", "pl", "sk", "sn", "sp", "st", "tr")
_VOWELS = ("a", "e", "i", "o", "u")
_CODAS = ("b", "d", "g", "k", "m", "n", "p", "t", "x")
_TEMPLATE_WORDS = ("a", "the", "and", "is", "are", "there", "this", "what", "which", "how", "many", "where",
                   "colour", "shape", "size", "object", "way", "does", "move", "moves", "of", "above", "in",
                   "on", "at", "yes", "no", "shapes")
_RESERVED_WORDS = frozenset(
    (*_TEMPLATE_WORDS, *SHAPES, *(f"{s}s" for s in SHAPES), *COLOURS, *SIZES, *ROWS, *COLUMNS, *DIRECTIONS,
     *SPEEDS, *SPEED_ADVERBS.values(), *NUMBER_WORDS)
)
# Far below the ~176,000 words the syllables make, so rejecting repeats stays cheap.
_MAX_NONSENSE_WORDS = 10_000
_MAX_PLACEMENT_TRIES = 1000
VARIANT_ATTRIBUTES = ("shape", "colour", "size", "cell")   # what a hard negative may change
# What `Scene.qa()` and `Clip.qa()` ask about (`QA.attribute`).
SCENE_QA_ATTRIBUTES = ("count", "colour", "shape", "size", "position", "relation")
CLIP_QA_ATTRIBUTES = ("count", "colour", "shape", "size", "direction", "speed")
# Asked of scenes only when training names them (`DataConfig.qa_attributes`): `existence_questions`.
NAMED_QA_ATTRIBUTES = ("existence",)
# Their wording, one per kind: jobs/existence_cue.py asks the same question training does.
EXISTENCE_TEMPLATES = MappingProxyType({"colour": "Is there a {} shape?", "shape": "Is there a {}?"})
_MP4_OPTIONS = MappingProxyType(
    # Near-lossless; no B-frames so frame-accurate seeking (decord) is trivial; one thread because x264's
    # output depends on its thread count, which would otherwise follow the machine's cores.
    {"crf": "18", "preset": "medium", "bf": "0", "threads": "1"}
)


@dataclass(frozen=True)
class QA:
    """One question about a single attribute; `attribute` is colour, shape, size, count, position,
    relation, direction, speed or (asked only by the evaluation) existence, so accuracy can be reported
    per attribute."""

    question: str
    answer: str
    attribute: str

    @property
    def prompt(self) -> str:
        """What the model is given; its answer follows after a space."""
        return f"Question: {self.question} Answer:"


@dataclass(frozen=True)
class Thing:
    """What an object is, wherever it is."""

    shape: str
    colour: str
    size: str

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def description(self) -> str:
        return f"{self.size} {self.colour} {self.shape}"


@dataclass(frozen=True)
class SceneObject(Thing):
    """An object in a scene: grid cell (`row`, `col`), centre (`x`, `y`) and bounding radius in pixels.
    The whole object lies inside its cell."""

    row: int
    col: int
    x: float
    y: float
    radius: float

    @property
    def position(self) -> str:
        return position_name(self.row, self.col)


@dataclass(frozen=True)
class MovingObject(Thing):
    """An object in a clip: centre (`x`, `y`) in frame 0, bounding radius and `step` (pixels moved per
    frame towards `direction`) in pixels. It stays fully inside the frame for the whole clip."""

    x: float
    y: float
    radius: float
    direction: str
    speed: str
    step: float

    def centre(self, frame: int) -> tuple[float, float]:
        dx, dy = DIRECTIONS[self.direction]
        return self.x + dx * self.step * frame, self.y + dy * self.step * frame


@dataclass(frozen=True)
class Scene:
    """A still image of shapes, with its ground truth."""

    objects: tuple[SceneObject, ...]
    image_size: int = 64
    kind: ClassVar[str] = "image"
    media_extension: ClassVar[str] = "png"

    def image(self) -> np.ndarray:
        """(H, W, 3) uint8 pixels."""
        return _render(self.image_size, ((o.shape, o.colour, o.x, o.y, o.radius) for o in self.objects))

    def png(self) -> bytes:
        return encode_png(self.image())

    def media_bytes(self) -> bytes:
        return self.png()

    def caption(self) -> str:
        """'a large red circle at the top left and a small blue square on the right.'"""
        return _join([f"a {o.description} {_position_phrase(o.position)}" for o in self.objects]) + "."

    def relations(self) -> list[str]:
        """'the circle is left of the blue square', one per pair of objects and axis they differ on."""
        relations = []
        for a, b in combinations(self.objects, 2):
            if a.col != b.col:
                left, right = sorted((a, b), key=lambda o: o.col)
                relations.append(f"{_reference(left, self.objects)} is left of {_reference(right, self.objects)}")
            if a.row != b.row:
                upper, lower = sorted((a, b), key=lambda o: o.row)
                relations.append(f"{_reference(upper, self.objects)} is above {_reference(lower, self.objects)}")
        return relations

    def qa(self) -> list[QA]:
        qa = _thing_questions(self.objects)
        qa += [QA(f"Where is {_reference(o, self.objects)}?", o.position, "position") for o in self.objects]
        for a, b in permutations(self.objects, 2):  # both orders, so yes and no are equally common
            first, second = _reference(a, self.objects), _reference(b, self.objects)
            if a.col != b.col:
                qa.append(QA(f"Is {first} left of {second}?", _yes_no(a.col < b.col), "relation"))
            if a.row != b.row:
                qa.append(QA(f"Is {first} above {second}?", _yes_no(a.row < b.row), "relation"))
        return qa

    def attributes(self) -> dict[str, Any]:
        """The ground truth as JSON-ready data."""
        return {
            "kind": self.kind,
            "image_size": self.image_size,
            "objects": [asdict(o) | {"position": o.position} for o in self.objects],
            "relations": self.relations(),
        }


@dataclass(frozen=True)
class Clip:
    """A short video of moving shapes, with its ground truth."""

    objects: tuple[MovingObject, ...]
    image_size: int = 64
    num_frames: int = 8
    fps: int = 8
    kind: ClassVar[str] = "video"
    media_extension: ClassVar[str] = "mp4"

    def frames(self) -> np.ndarray:
        """(T, H, W, 3) uint8 pixels."""
        return np.stack(
            [
                _render(self.image_size, ((o.shape, o.colour, *o.centre(t), o.radius) for o in self.objects))
                for t in range(self.num_frames)
            ]
        )

    def mp4(self) -> bytes:
        return encode_mp4(self.frames(), self.fps)

    def media_bytes(self) -> bytes:
        return self.mp4()

    def caption(self) -> str:
        """'a small red circle moves left slowly and a large blue square moves up quickly.'"""
        return _join([f"a {o.description} moves {o.direction} {SPEED_ADVERBS[o.speed]}" for o in self.objects]) + "."

    def qa(self) -> list[QA]:
        qa = _thing_questions(self.objects)
        for o in self.objects:
            reference = _reference(o, self.objects)
            qa.append(QA(f"Which way does {reference} move?", o.direction, "direction"))
            qa.append(QA(f"How fast does {reference} move?", o.speed, "speed"))
        return qa

    def attributes(self) -> dict[str, Any]:
        """The ground truth as JSON-ready data."""
        return {
            "kind": self.kind,
            "image_size": self.image_size,
            "num_frames": self.num_frames,
            "fps": self.fps,
            "objects": [asdict(o) for o in self.objects],
        }


Sample = Scene | Clip


@dataclass(frozen=True)
class BindingEpisode:
    """A fast-binding few-shot episode: `words[i]` is bound to `categories[i]` ('circle', or 'red circle'
    for colour + shape categories) for this episode only. The support pairs show each category `shots`
    times as (`support[j]`, 'This is a bliket.'); the query image belongs to the category bound to `answer`,
    one of the `words` (chance = 1 / len(words)). Prompt: supports, then the query image and QUERY_TEXT."""

    words: tuple[str, ...]
    categories: tuple[str, ...]
    support: tuple[Scene, ...]
    support_words: tuple[str, ...]      # the word shown with each support image
    query: Scene
    answer: str
    query_text: str = QUERY_TEXT

    @property
    def support_texts(self) -> tuple[str, ...]:
        return tuple(SUPPORT_TEXT.format(word=word) for word in self.support_words)

    @property
    def chance(self) -> float:
        return 1 / len(self.words)

    def support_images(self) -> list[np.ndarray]:
        return [scene.image() for scene in self.support]

    def query_image(self) -> np.ndarray:
        return self.query.image()


# --- generators ----------------------------------------------------------------------------------


def make_scene(seed: Seed, *, image_size: int = 64, max_objects: int = 3, min_objects: int = 1) -> Scene:
    """A scene of `min_objects`..`max_objects` objects (at most 9, one per grid cell) whose colour + shape
    pairs are distinct, so 'the red circle' always names one object."""
    _check_image_size(image_size)
    if not 1 <= min_objects <= max_objects <= GRID * GRID:
        raise ValueError(f"need 1 <= min_objects <= max_objects <= {GRID * GRID}, got {min_objects}, {max_objects}")
    rng = np.random.default_rng(seed)
    count = int(rng.integers(min_objects, max_objects + 1))
    cells = rng.choice(GRID * GRID, size=count, replace=False)
    things = _distinct_things(rng, count)
    objects = tuple(_place(rng, thing, *divmod(int(cell), GRID), image_size) for thing, cell in zip(things, cells))
    return Scene(objects, image_size)


def make_clip(seed: Seed, *, image_size: int = 64, num_frames: int = 8, fps: int = 8, max_objects: int = 2) -> Clip:
    """A clip of 1..`max_objects` objects, each moving in its own direction at its own speed, fully
    inside the frame and never touching another one."""
    _check_image_size(image_size)
    if image_size % 2:
        raise ValueError(f"image_size must be even for H.264 (yuv420p), got {image_size}")
    if num_frames < 1 or fps < 1 or max_objects < 1:
        raise ValueError(f"num_frames, fps and max_objects must be positive, got {num_frames}, {fps}, {max_objects}")
    worst = 2 * max(SIZES.values()) + max(SPEEDS.values()) * (num_frames - 1) / fps
    if worst > 1:
        raise ValueError(
            f"a fast large object would leave the frame within {num_frames} frames at {fps} fps; "
            "use fewer frames or a higher fps"
        )
    rng = np.random.default_rng(seed)
    things = _distinct_things(rng, int(rng.integers(1, max_objects + 1)))
    for _ in range(_MAX_PLACEMENT_TRIES):
        objects = tuple(_launch(rng, thing, image_size, num_frames, fps) for thing in things)
        if not any(_touch(a, b, t) for a, b in combinations(objects, 2) for t in range(num_frames)):
            return Clip(objects, image_size, num_frames, fps)
    raise ValueError(f"cannot place {len(things)} moving objects apart in a {image_size}px frame; lower max_objects")


def scene_variant(seed: Seed, scene: Scene, attributes: Sequence[str] = VARIANT_ATTRIBUTES) -> Scene:
    """`scene` with one attribute of one object changed (shape, colour, size or grid cell): a hard
    negative whose caption differs from the original's in exactly one word or position phrase. The attribute
    is drawn uniformly from `attributes` (name one twice to draw it twice as often)."""
    rng = np.random.default_rng(seed)
    objects = list(scene.objects)
    index = int(rng.integers(len(objects)))
    old = objects[index]
    taken = {(o.colour, o.shape) for o in objects if o is not old}
    for _ in range(_MAX_PLACEMENT_TRIES):
        attribute = pick(rng, attributes)
        if attribute == "cell":
            free = sorted(set(range(GRID * GRID)) - {o.row * GRID + o.col for o in objects})
            if not free:
                continue
            row, col = divmod(int(rng.choice(free)), GRID)
            thing = Thing(old.shape, old.colour, old.size)
        else:
            options = {"shape": SHAPES, "colour": COLOURS, "size": SIZES}[attribute]
            value = pick(rng, [v for v in options if v != getattr(old, attribute)])
            thing = Thing(**{**{k: getattr(old, k) for k in ("shape", "colour", "size")}, attribute: value})
            row, col = old.row, old.col
        if (thing.colour, thing.shape) not in taken:
            objects[index] = _place(rng, thing, row, col, scene.image_size)
            return Scene(tuple(objects), scene.image_size)
    raise ValueError("cannot vary this scene")   # unreachable: a colour or size change always fits


def make_binding_episode(
    seed: Seed, *, ways: int = 2, shots: int = 1, category: str = "shape", image_size: int = 64
) -> BindingEpisode:
    """An episode binding `ways` categories -- shapes (colour varies, so only the shape identifies the
    word) or colour + shape pairs -- to fresh nonsense words, with `shots` single-object support images
    per category in shuffled order, and a query image that differs from every support image. `category`
    is one of BINDING_CATEGORIES (a plain string, as configs give it; checked here)."""
    _check_image_size(image_size)
    if category == "shape":
        pool: list[tuple[str | None, str]] = [(None, shape) for shape in SHAPES]
    elif category == "colour_shape":
        pool = [(colour, shape) for colour in COLOURS for shape in SHAPES]
    else:
        raise ValueError(f"category must be 'shape' or 'colour_shape', got {category!r}")
    if not 1 <= ways <= len(pool) or shots < 1:
        raise ValueError(f"need 1 <= ways <= {len(pool)} and shots >= 1, got ways={ways}, shots={shots}")
    rng = np.random.default_rng(seed)
    chosen = [pool[int(i)] for i in rng.choice(len(pool), size=ways, replace=False)]
    words = nonsense_words(rng, ways)
    order = [int(i) for i in rng.permutation(np.repeat(np.arange(ways), shots))]
    support = tuple(_exemplar(rng, *chosen[i], image_size) for i in order)
    target = int(rng.integers(ways))
    for _ in range(_MAX_PLACEMENT_TRIES):
        query = _exemplar(rng, *chosen[target], image_size)
        if all(_layout(query) != _layout(scene) for scene in support):
            break
    else:
        raise ValueError("cannot draw a query image unlike every support image; lower shots")
    return BindingEpisode(
        words=words,
        categories=tuple(shape if colour is None else f"{colour} {shape}" for colour, shape in chosen),
        support=support,
        support_words=tuple(words[i] for i in order),
        query=query,
        answer=words[target],
    )


def nonsense_words(seed: Seed, count: int) -> tuple[str, ...]:
    """`count` distinct pronounceable nonsense words ('bliket', 'dovax'), none used by the world's
    captions or questions."""
    if not 0 <= count <= _MAX_NONSENSE_WORDS:
        raise ValueError(f"count must be in 0..{_MAX_NONSENSE_WORDS}, got {count}")
    rng = np.random.default_rng(seed)
    words: list[str] = []
    while len(words) < count:
        word = "".join(pick(rng, _ONSETS) + pick(rng, _VOWELS) for _ in range(2)) + pick(rng, _CODAS)
        if word not in _RESERVED_WORDS and word not in words:
            words.append(word)
    return tuple(words)


def position_name(row: int, col: int) -> str:
    """A grid cell in words: 'top left', 'top', 'left', 'centre', ... (middle row and centre column go
    unsaid)."""
    parts = []
    if row != GRID // 2:
        parts.append(ROWS[row])
    if col != GRID // 2:
        parts.append(COLUMNS[col])
    return " ".join(parts) or "centre"


# --- encoding ------------------------------------------------------------------------------------


def encode_png(pixels: np.ndarray) -> bytes:
    """PNG bytes of (H, W, 3) uint8 pixels, with no metadata (so same pixels -> same bytes)."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=9)
    return buffer.getvalue()


def encode_mp4(frames: np.ndarray, fps: int) -> bytes:
    """H.264 (libx264, yuv420p) mp4 bytes of (T, H, W, 3) uint8 frames; H and W must be even. H.264 in mp4
    is what decord, browsers and ffmpeg all read; the muxer writes no wall-clock time, so the bytes
    depend on the frames only."""
    _, height, width, _ = frames.shape
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        stream.options = dict(_MP4_OPTIONS)
        for pixels in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels), format="rgb24")))
        container.mux(stream.encode())
    return buffer.getvalue()


# --- helpers -------------------------------------------------------------------------------------


def _check_image_size(image_size: int) -> None:
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16 pixels, got {image_size}")


def pick(rng: np.random.Generator, options: Iterable[T]) -> T:
    """One of `options`, uniformly."""
    choices = tuple(options)
    return choices[int(rng.integers(len(choices)))]


def _distinct_things(rng: np.random.Generator, count: int) -> list[Thing]:
    """`count` objects with distinct colour + shape pairs and random sizes."""
    colours = tuple(COLOURS)
    pairs = rng.choice(len(colours) * len(SHAPES), size=count, replace=False)
    return [Thing(SHAPES[int(p) % len(SHAPES)], colours[int(p) // len(SHAPES)], pick(rng, SIZES)) for p in pairs]


def _place(rng: np.random.Generator, thing: Thing, row: int, col: int, image_size: int) -> SceneObject:
    """`thing` in grid cell (row, col), its centre jittered as far as the cell allows."""
    cell = image_size / GRID
    radius = round(SIZES[thing.size] * image_size, 2)
    slack = cell / 2 - radius
    x, y = ((index + 0.5) * cell + rng.uniform(-slack, slack) for index in (col, row))
    return SceneObject(**asdict(thing), row=row, col=col, x=round(x, 2), y=round(y, 2), radius=radius)


def _launch(rng: np.random.Generator, thing: Thing, image_size: int, num_frames: int, fps: int) -> MovingObject:
    """`thing` with a random direction and speed, starting where its whole path stays in the frame."""
    direction, speed = pick(rng, DIRECTIONS), pick(rng, SPEEDS)
    radius = round(SIZES[thing.size] * image_size, 2)
    step = round(SPEEDS[speed] * image_size / fps, 4)
    travel = step * (num_frames - 1)
    start = []
    for unit in DIRECTIONS[direction]:
        low = radius + (travel if unit < 0 else 0)
        high = image_size - radius - (travel if unit > 0 else 0)
        start.append(round(rng.uniform(low, high), 2))
    return MovingObject(**asdict(thing), x=start[0], y=start[1], radius=radius,
                        direction=direction, speed=speed, step=step)


def _touch(a: MovingObject, b: MovingObject, frame: int) -> bool:
    """Whether the bounding boxes of `a` and `b` (plus a pixel of margin) meet in `frame`."""
    (ax, ay), (bx, by) = a.centre(frame), b.centre(frame)
    reach = a.radius + b.radius + 1
    return abs(ax - bx) < reach and abs(ay - by) < reach


def _exemplar(rng: np.random.Generator, colour: str | None, shape: str, image_size: int) -> Scene:
    """A one-object scene of `shape` (and `colour`, or a random one), random size and cell."""
    thing = Thing(shape, colour or pick(rng, COLOURS), pick(rng, SIZES))
    row, col = divmod(int(rng.integers(GRID * GRID)), GRID)
    return Scene((_place(rng, thing, row, col, image_size),), image_size)


def _layout(scene: Scene) -> list[tuple[str, str, str, int, int]]:
    """What a scene shows, up to the jitter inside grid cells."""
    return [(o.shape, o.colour, o.size, o.row, o.col) for o in scene.objects]


def _render(image_size: int, shapes: Iterable[tuple[str, str, float, float, float]]) -> np.ndarray:
    """Pixels of (shape, colour, x, y, radius) objects drawn in order on the background."""
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for shape, colour, x, y, radius in shapes:
        fill = COLOURS[colour]
        if shape == "circle":
            draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=fill)
        elif shape == "square":
            half = 0.85 * radius  # about the area of the circle of the same size
            draw.rectangle((x - half, y - half, x + half, y + half), fill=fill)
        elif shape == "triangle":
            draw.polygon(_star_points(x, y, (radius,), 3), fill=fill)
        elif shape == "star":
            draw.polygon(_star_points(x, y, (radius, 0.45 * radius), 10), fill=fill)
        else:
            raise ValueError(f"unknown shape {shape!r}")
    return np.asarray(image)


def drawn_mask(shape: str, x: float, y: float, radius: float, image_size: int) -> np.ndarray:
    """(image_size, image_size) bools: the pixels one object covers, drawn as `_render` draws it (a square's
    corners and the rasteriser's edge pixels reach beyond `radius`)."""
    return (_render(image_size, [(shape, "red", x, y, radius)]) != BACKGROUND).any(-1)


def _star_points(x: float, y: float, radii: Sequence[float], points: int) -> list[tuple[float, float]]:
    """`points` vertices around (x, y), the first straight up, at the `radii` in turn (one radius: a
    regular polygon; two: a star)."""
    vertices = []
    for k in range(points):
        angle = -math.pi / 2 + 2 * math.pi * k / points
        radius = radii[k % len(radii)]
        vertices.append((x + radius * math.cos(angle), y + radius * math.sin(angle)))
    return vertices


def _thing_questions(things: Sequence[Thing]) -> list[QA]:
    """Count, colour, shape and size questions, each asked only where its reference is unambiguous."""
    shape_counts = {shape: sum(t.shape == shape for t in things) for shape in SHAPES}
    colour_counts = {colour: sum(t.colour == colour for t in things) for colour in COLOURS}
    qa = [QA("How many shapes are there?", NUMBER_WORDS[len(things)], "count")]
    qa += [QA(f"How many {shape}s are there?", NUMBER_WORDS[n], "count") for shape, n in shape_counts.items() if n]
    for thing in things:
        if shape_counts[thing.shape] == 1:
            qa.append(QA(f"What colour is the {thing.shape}?", thing.colour, "colour"))
        if colour_counts[thing.colour] == 1:
            qa.append(QA(f"What shape is the {thing.colour} object?", thing.shape, "shape"))
        qa.append(QA(f"What size is {_reference(thing, things)}?", thing.size, "size"))
    return qa


def existence_questions(things: Sequence[Thing], rng: np.random.Generator) -> list[QA]:
    """'Is there a red shape?' and 'Is there a circle?', each once with 'yes' and once with 'no': the
    question a yes/no classify task such as jobs/tasks/has_red.yaml asks. The 'yes' asks about the first
    object (objects come in random order); the 'no' about a colour / shape drawn at random from those absent
    from the scene. Drawn, not the next absent one in a fixed order: then 'red? no' came only with purple in
    the scene, and the model learnt that cue instead of looking for red (docs/existence.md).

    `qa()` leaves them out: training on them among all questions (stages 2 and 3, two recipe runs of an
    earlier tower) left the model at chance on them and moved the other figures (docs/existence.md). Training
    asks them only when `DataConfig.qa_attributes` names 'existence'."""
    qa = []
    for kind, options in (("colour", tuple(COLOURS)), ("shape", SHAPES)):
        template = EXISTENCE_TEMPLATES[kind]
        present = {getattr(t, kind) for t in things}
        absent = pick(rng, [o for o in options if o not in present])
        qa += [QA(template.format(getattr(things[0], kind)), "yes", "existence"),
               QA(template.format(absent), "no", "existence")]
    return qa


def _reference(thing: Thing, things: Sequence[Thing]) -> str:
    """'the circle' when it is the only circle, else 'the red circle' (colour + shape pairs are unique)."""
    if sum(t.shape == thing.shape for t in things) == 1:
        return f"the {thing.shape}"
    return f"the {thing.name}"


def _position_phrase(position: str) -> str:
    if position == "centre":
        return "in the centre"
    if position in ("left", "right"):
        return f"on the {position}"
    return f"at the {position}"


def _join(phrases: Sequence[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    return phrases[0] if len(phrases) == 1 else f"{', '.join(phrases[:-1])} and {phrases[-1]}"


def _yes_no(value: bool) -> str:
    return "yes" if value else "no"
