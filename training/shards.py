"""Write the synthetic world (`training.synthetic`) as ordinary shards, which the pipeline reads exactly
like user data (see `media/files.py`):

  WebDataset  `NNNNN.tar`: per sample `{key}.png` (scenes) or `{key}.mp4` (clips), `{key}.txt` (the
              caption) and `{key}.json` (key, url, caption, ground-truth attributes, QA pairs).
  img2dataset `NNNNN.parquet`: one row per scene with img2dataset's columns -- `key`, `url`, `caption`,
              the image bytes in `png` (img2dataset names that column after the encoding), `status`
              "success", `error_message` null, `width`, `height` -- plus `json`, the metadata above as
              text. Images only: the pipeline takes every Parquet row for an image.

Output is byte-reproducible (same samples -> same bytes): tar members get fixed metadata (mtime 0,
uid/gid 0, mode 0o644, ustar format). A shard is written under a hidden temporary name and renamed when
complete, so a reader listing the directory never sees half a shard.

Sample `i` of `make_shards(..., seed)` is `make_scene((seed, 0, i))` or `make_clip((seed, 1, i))`, also
named by its url `synthetic://image/{seed}/{i}` / `synthetic://video/{seed}/{i}`: any one sample can be
regenerated on its own, whatever the shard layout.

Command line: `python -m training.shards sample OUT_DIR` writes the small bundled sample set;
`python -m training.shards shards OUT_DIR --images N --clips N ...` writes a data set.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from training.synthetic import Sample, Scene, make_clip, make_scene

ShardFormat = Literal["webdataset", "parquet"]
KEY_WIDTH = 6
SHARD_NAME_WIDTH = 5
_SHARD_EXTENSIONS = {"webdataset": "tar", "parquet": "parquet"}
_MEMBER_MODE = 0o644
# img2dataset's default output columns, with the image bytes column named after PNG, plus the metadata.
PARQUET_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("url", pa.string()),
        ("caption", pa.string()),
        ("png", pa.binary()),
        ("status", pa.string()),
        ("error_message", pa.string()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("json", pa.string()),
    ]
)
SAMPLE_IMAGES = 16
SAMPLE_CLIPS = 4


@dataclass(frozen=True)
class ShardItem:
    """A sample with the key it is stored under and the url it is recorded with."""

    key: str
    sample: Sample
    url: str | None = None


def write_webdataset(path: str | os.PathLike[str], samples: Iterable[Sample | ShardItem]) -> Path:
    """Write a WebDataset shard of `samples` (bare samples get keys 000000, 000001, ... in order; keys
    must be sorted and unique). Returns the path."""
    with _atomic_output(path) as (final, temporary):
        with tarfile.open(temporary, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for item in _items(samples):
                _add_member(tar, f"{item.key}.{item.sample.media_extension}", item.sample.media_bytes())
                _add_member(tar, f"{item.key}.txt", item.sample.caption().encode())
                _add_member(tar, f"{item.key}.json", json.dumps(metadata(item)).encode())
    return final


def write_img2dataset_parquet(path: str | os.PathLike[str], samples: Iterable[Scene | ShardItem]) -> Path:
    """Write an img2dataset-style Parquet shard of scenes (keys as in `write_webdataset`). Returns the
    path. Raises ValueError for a clip: Parquet shards hold images only."""
    rows = []
    for item in _items(samples):
        if not isinstance(item.sample, Scene):
            raise ValueError(f"sample {item.key} is a {item.sample.kind}; img2dataset Parquet shards hold images only")
        rows.append(
            {
                "key": item.key,
                "url": item.url,
                "caption": item.sample.caption(),
                "png": item.sample.png(),
                "status": "success",
                "error_message": None,
                "width": item.sample.image_size,
                "height": item.sample.image_size,
                "json": json.dumps(metadata(item)),
            }
        )
    with _atomic_output(path) as (final, temporary):
        pq.write_table(pa.Table.from_pylist(rows, schema=PARQUET_SCHEMA), temporary)
    return final


def metadata(item: ShardItem) -> dict[str, Any]:
    """What a sample's `.json` member (or `json` column) holds: key, url, caption, ground truth, QA."""
    sample = item.sample
    return {
        "key": item.key,
        "url": item.url,
        "caption": sample.caption(),
        **sample.attributes(),
        "qa": [asdict(qa) for qa in sample.qa()],
    }


def make_shards(
    out_dir: str | os.PathLike[str],
    n_images: int,
    n_clips: int = 0,
    seed: int = 0,
    shard_size: int = 1000,
    format: ShardFormat = "webdataset",
    *,
    image_size: int = 64,
    num_frames: int = 8,
    fps: int = 8,
) -> list[Path]:
    """Write `n_images` scenes then `n_clips` clips into shards `00000.tar`, `00001.tar`, ... (or
    `.parquet`, images only) of at most `shard_size` samples under `out_dir`, keys numbered across all
    shards. Files of the same names are replaced; others are left alone. Returns the shard paths."""
    if format not in _SHARD_EXTENSIONS:
        raise ValueError(f"format must be one of {sorted(_SHARD_EXTENSIONS)}, got {format!r}")
    if format == "parquet" and n_clips:
        raise ValueError("img2dataset Parquet shards hold images only; write clips with format='webdataset'")
    if min(n_images, n_clips, seed) < 0 or shard_size < 1:
        raise ValueError("n_images, n_clips and seed must be >= 0 and shard_size >= 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write = write_webdataset if format == "webdataset" else write_img2dataset_parquet
    items = _generate(n_images, n_clips, seed, image_size, num_frames, fps)
    paths: list[Path] = []
    while chunk := list(islice(items, shard_size)):
        paths.append(write(out / f"{len(paths):0{SHARD_NAME_WIDTH}d}.{_SHARD_EXTENSIONS[format]}", chunk))
    return paths


def write_sample(out_dir: str | os.PathLike[str], seed: int = 0) -> list[Path]:
    """The small sample set the README's main job annotates: one WebDataset shard of 16 scenes and 4
    clips (64 px, 8 frames at 8 fps), well under 300 KB."""
    return make_shards(out_dir, SAMPLE_IMAGES, SAMPLE_CLIPS, seed, shard_size=SAMPLE_IMAGES + SAMPLE_CLIPS)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m training.shards", description="Write synthetic shards.")
    commands = parser.add_subparsers(dest="command", required=True)
    sample = commands.add_parser(
        "sample", help=f"the bundled sample set ({SAMPLE_IMAGES} images, {SAMPLE_CLIPS} clips)")
    sample.add_argument("out_dir")
    sample.add_argument("--seed", type=int, default=0)
    shards = commands.add_parser("shards", help="a data set of scenes and clips")
    shards.add_argument("out_dir")
    shards.add_argument("--images", type=int, default=1000)
    shards.add_argument("--clips", type=int, default=0)
    shards.add_argument("--seed", type=int, default=0)
    shards.add_argument("--shard-size", type=int, default=1000)
    shards.add_argument("--format", choices=sorted(_SHARD_EXTENSIONS), default="webdataset")
    shards.add_argument("--image-size", type=int, default=64)
    shards.add_argument("--num-frames", type=int, default=8)
    shards.add_argument("--fps", type=int, default=8)
    args = parser.parse_args(argv)
    if args.command == "sample":
        paths = write_sample(args.out_dir, args.seed)
    else:
        paths = make_shards(
            args.out_dir, args.images, args.clips, args.seed, args.shard_size, args.format,
            image_size=args.image_size, num_frames=args.num_frames, fps=args.fps,
        )
    for path in paths:
        print(path)


# --- helpers -------------------------------------------------------------------------------------


def _generate(n_images: int, n_clips: int, seed: int, image_size: int, num_frames: int,
              fps: int) -> Iterator[ShardItem]:
    """The data set's items, lazily (one shard's worth is in memory at a time)."""
    for index in range(n_images):
        scene = make_scene((seed, 0, index), image_size=image_size)
        yield ShardItem(_key(index), scene, f"synthetic://image/{seed}/{index}")
    for index in range(n_clips):
        clip = make_clip((seed, 1, index), image_size=image_size, num_frames=num_frames, fps=fps)
        yield ShardItem(_key(n_images + index), clip, f"synthetic://video/{seed}/{index}")


def _key(index: int) -> str:
    return f"{index:0{KEY_WIDTH}d}"


def _items(samples: Iterable[Sample | ShardItem]) -> Iterator[ShardItem]:
    """ShardItems with sorted, unique keys that webdataset splits back unchanged."""
    previous = None
    for index, sample in enumerate(samples):
        item = sample if isinstance(sample, ShardItem) else ShardItem(_key(index), sample)
        if not item.key or any(c in item.key for c in "./") or (previous is not None and item.key <= previous):
            raise ValueError(f"key {item.key!r} must be non-empty, without '.' or '/', and sort after {previous!r}")
        previous = item.key
        yield item


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = _MEMBER_MODE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


@contextmanager
def _atomic_output(path: str | os.PathLike[str]) -> Iterator[tuple[Path, Path]]:
    """`with _atomic_output(path) as (final, temporary)`: write `temporary`, a hidden name next to `path`
    (the pipeline's listing skips hidden files); it becomes `path` only if the block succeeds."""
    final = Path(path)
    temporary = final.with_name(f".{final.name}.partial")
    try:
        yield final, temporary
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    os.replace(temporary, final)


if __name__ == "__main__":
    main()
