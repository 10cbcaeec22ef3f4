"""Memory of one stand-in actor of each pool (pipeline/stand_in.py) in a real Ray Data actor worker:

    .venv/bin/python jobs/measure_actor_memory.py [--root DIR]

A local Ray instance runs a few rows of 32 px pixels through a pool of one vision stand-in, one generation
stand-in and, for comparison, one actor of a class that imports nothing of the project (Ray Data's own cost per
actor), one row per batch and a second's sleep per item, so that every actor stays alive while it is sampled.
Every half second the actor processes (found by their Ray process title) are read from /proc: USS, the memory
only that process holds (private clean + private dirty pages of /proc/PID/smaps_rollup, as psutil's `uss`),
RSS, and whether libtorch is mapped. Prints each actor's peak USS, its RSS then and whether torch was loaded.

`--root DIR` measures the stand-ins of another checkout of the project (e.g. an older commit unpacked with
`git archive COMMIT | tar -x -C DIR`): its packages are imported, by this process and by the actors, from there.
Linux only (/proc). Not measured: the generation stand-in's `--actor-mb` ballast, which adds its own size.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

ITEMS = 8
ITEM_SECONDS = 1.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=str(Path(__file__).resolve().parents[1]), help="the project to measure")
    args = parser.parse_args(argv)
    root = Path(args.root).resolve()
    os.chdir(root)                 # Ray puts the driver's working directory on its workers' path
    sys.path.insert(0, str(root))
    peaks = measure(root)
    print(f"stand-ins of {root}")
    for title, (uss, rss, torch) in sorted(peaks.items()):
        print(f"  {title:48s} USS {uss:6.0f} MB   RSS {rss:6.0f} MB   torch loaded: {'yes' if torch else 'no'}")
    return 0


class PlainActor:
    """A Ray Data actor that imports nothing of the project: what an actor costs before any model code."""

    def __call__(self, batch: Any) -> Any:
        return batch


def measure(root: Path) -> dict[str, tuple[float, float, bool]]:
    """Actor title -> (peak USS MB, RSS MB at that peak, libtorch mapped) over a short run of the three actors."""
    import numpy as np
    import pyarrow as pa
    import ray
    import ray.data

    from pipeline.stand_in import stand_in_actors
    from pipeline.task import load_tasks
    try:
        from pipeline.annotator_spec import AnnotatorSpec
    except ImportError:            # checkouts from before the spec had a module of its own
        from pipeline.generate import AnnotatorSpec

    work = Path(tempfile.mkdtemp(prefix="actor-memory-"))
    task_file = work / "task.yaml"
    task_file.write_text("name: t\nkind: generate\nquery: 'Caption:'\n")
    spec = AnnotatorSpec(model="tiny-random", trust_remote_code=False, tasks=tuple(load_tasks([str(task_file)])))
    encoder, annotator = stand_in_actors(ITEM_SECONDS, vision_item_seconds=ITEM_SECONDS / 2)
    pixels = np.zeros((1, 3, 32, 32), np.uint8)
    rows = pa.Table.from_pylist([{"id": str(i), "source": "s", "media_kind": "image", "error": None,
                                  "error_kind": None, "metadata": None, "done_tasks": None,
                                  "pixels": pixels.tobytes(), "pixels_shape": list(pixels.shape),
                                  "pixels_dtype": "uint8"} for i in range(ITEMS)])

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=str(work / "ray"))
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        one: dict[str, Any] = {"batch_format": "pyarrow", "batch_size": 1, "num_cpus": 0.1}
        ds = ray.data.from_arrow(rows).repartition(ITEMS)
        ds = ds.map_batches(encoder, fn_constructor_kwargs={"model": "tiny-random"},
                            compute=ray.data.ActorPoolStrategy(size=1), **one)
        ds = ds.map_batches(annotator, fn_constructor_args=(spec,), compute=ray.data.ActorPoolStrategy(size=1), **one)
        ds = ds.map_batches(PlainActor, compute=ray.data.ActorPoolStrategy(size=1), **one)
        peaks: dict[str, tuple[float, float, bool]] = {}
        stop = threading.Event()
        sampler = threading.Thread(target=sample, args=(peaks, stop))
        sampler.start()
        try:
            count = sum(len(batch) for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None))
        finally:
            stop.set()
            sampler.join()
    finally:
        ray.shutdown()
    if count != ITEMS:
        raise RuntimeError(f"{count} rows came out of {ITEMS}")
    return peaks


def sample(peaks: dict[str, tuple[float, float, bool]], stop: threading.Event) -> None:
    while not stop.wait(0.5):
        for title, pid in actor_processes().items():
            try:
                figures = memory(pid)
            except OSError:        # the actor ended between the listing and the reading
                continue
            if title not in peaks or figures[0] > peaks[title][0]:
                peaks[title] = figures


def actor_processes() -> dict[str, int]:
    """Ray Data actor title ("MapWorker(MapBatches(StandInAnnotator))") -> pid, from the process titles Ray sets."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            title = (proc / "cmdline").read_bytes().split(b"\0")[0].decode()
        except OSError:
            continue
        if title.startswith("ray::MapWorker(MapBatches("):
            found[title.removeprefix("ray::").split(")")[0] + "))"] = int(proc.name)
    return found


def memory(pid: int) -> tuple[float, float, bool]:
    """(USS MB, RSS MB, libtorch mapped) of a process."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value = line.split(":")
        fields[name] = int(value.split()[0])  # kB
    torch = "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    return (fields["Private_Clean"] + fields["Private_Dirty"]) / 1024, fields["Rss"] / 1024, torch


if __name__ == "__main__":
    sys.exit(main())
