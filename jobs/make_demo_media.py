"""Draw the example tasks' demonstration images (jobs/tasks/demos/) and the bundled sample input (jobs/sample/).

The files are committed; run this only to change them: `python jobs/make_demo_media.py`. Everything is drawn from
fixed parameters (no randomness), so a re-run with the same Pillow/PyAV versions rewrites identical files.
Flat colours on plain backgrounds keep each image a few KB while still giving the model something to describe.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

JOBS_DIR = Path(__file__).resolve().parent
DEMOS_DIR = JOBS_DIR / "tasks" / "demos"
SAMPLE_DIR = JOBS_DIR / "sample"

COLOURS = {"red": (214, 39, 40), "green": (44, 160, 44), "blue": (31, 119, 180)}
BACKGROUNDS = {"white": (255, 255, 255), "grey": (200, 200, 200), "cream": (250, 240, 210)}
IMAGE_SIZE = 224

# (shape, colour) pairs for the demonstrations: every shape and every colour appears, so the few-shot prompts
# do not tie a colour to a shape.
DEMOS = [("circle", "red"), ("square", "green"), ("triangle", "blue"),
         ("circle", "green"), ("square", "blue"), ("triangle", "red")]

# (file name, shape, colour, background, centre as a fraction of the size, radius as a fraction of the size)
SAMPLE_IMAGES = [
    ("01_blue_circle.png", "circle", "blue", "white", (0.5, 0.5), 0.30),
    ("02_red_square.png", "square", "red", "white", (0.4, 0.6), 0.25),
    ("03_green_triangle.png", "triangle", "green", "grey", (0.5, 0.45), 0.35),
    ("04_red_circle.jpg", "circle", "red", "cream", (0.3, 0.3), 0.20),
    ("05_blue_triangle.png", "triangle", "blue", "cream", (0.6, 0.55), 0.30),
    ("06_green_square.jpg", "square", "green", "grey", (0.5, 0.5), 0.35),
    ("07_green_circle.png", "circle", "green", "white", (0.7, 0.4), 0.20),
    ("08_blue_square.png", "square", "blue", "grey", (0.35, 0.65), 0.22),
]

# (file name, shape, colour, background): the shape crosses the frame from left to right.
SAMPLE_VIDEOS = [
    ("09_moving_red_circle.mp4", "circle", "red", "white"),
    ("10_moving_blue_triangle.mp4", "triangle", "blue", "cream"),
]
VIDEO_SIZE, VIDEO_FRAMES, VIDEO_FPS = 128, 24, 12


def draw_shape(shape: str, colour: str, background: str = "white", size: int = IMAGE_SIZE,
               centre: tuple[float, float] = (0.5, 0.5), radius: float = 0.3) -> Image.Image:
    """One flat shape on a plain background; centre and radius are fractions of the image size."""
    image = Image.new("RGB", (size, size), BACKGROUNDS[background])
    cx, cy, r = centre[0] * size, centre[1] * size, radius * size
    draw = ImageDraw.Draw(image)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return image


def write_video(path: Path, shape: str, colour: str, background: str) -> None:
    """A short H.264 clip of the shape moving across the frame (PyAV bundles the encoder; no system ffmpeg)."""
    import av  # only needed here; a test dependency of the project

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=VIDEO_FPS)
        stream.width = stream.height = VIDEO_SIZE
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "30", "threads": "1"}  # one thread: the encoder's output is then reproducible
        for i in range(VIDEO_FRAMES):
            x = 0.2 + 0.6 * i / (VIDEO_FRAMES - 1)
            frame = draw_shape(shape, colour, background, size=VIDEO_SIZE, centre=(x, 0.5), radius=0.15)
            container.mux(stream.encode(av.VideoFrame.from_image(frame)))
        container.mux(stream.encode())


def main() -> None:
    DEMOS_DIR.mkdir(parents=True, exist_ok=True)
    SAMPLE_DIR.mkdir(parents=True, exist_ok=True)
    for shape, colour in DEMOS:
        draw_shape(shape, colour).save(DEMOS_DIR / f"{colour}_{shape}.png", optimize=True)
    for name, shape, colour, background, centre, radius in SAMPLE_IMAGES:
        image = draw_shape(shape, colour, background, centre=centre, radius=radius)
        if name.endswith(".jpg"):
            image.save(SAMPLE_DIR / name, quality=85)
        else:
            image.save(SAMPLE_DIR / name, optimize=True)
    for name, shape, colour, background in SAMPLE_VIDEOS:
        write_video(SAMPLE_DIR / name, shape, colour, background)
    total = sum(p.stat().st_size for d in (DEMOS_DIR, SAMPLE_DIR) for p in d.iterdir())
    print(f"wrote {DEMOS_DIR} and {SAMPLE_DIR} ({total / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
