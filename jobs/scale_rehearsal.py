"""Scale rehearsal: the real annotation job (`pipeline.job.run_job`) on a multi-node Ray cluster on this machine,
with the models replaced by stand-ins (pipeline/stand_in.py), over synthetic input on a local S3 server.

    python jobs/scale_rehearsal.py --json rehearsal.json          # the full rehearsal (tens of minutes)
    python jobs/scale_rehearsal.py --small                        # the same steps at toy sizes (~1 min)

What runs. A `ray.cluster_utils.Cluster` (real raylets on this machine): a head with 2 CPUs and `--nodes`
worker nodes, each declaring `--gpus-per-node` units of the custom resource `stand_in_gpu`, which every
generation actor claims one of, as a GPU actor claims a GPU. The input is img2dataset Parquet shards of
`--items-per-shard` tiny PNGs (8x8) on a moto S3 server on 127.0.0.1 (started here unless `--endpoint` names
one); the stand-in model's image size is 32 px (`tiny-random`'s), so decoding and moving pixels stay small
next to the stand-in's own cost. Every job runs in a fresh child process (the driver), so its peak memory is
its own.

What it measures, in this order:
1. `read`: the read side alone (listing, reading and decoding the pool input, no actors): items/s.
2. `pools`: the job at generation pools of `--pools` actors, each actor doing `--batches-per-actor` batches:
   the busy share of the actors over the steady part (`pipeline.stand_in.utilisation`) against the pool's
   capacity (actors / seconds per item), items/s, the object store's peak (sampled), driver peak RSS, output
   files and their sizes.
3. `resume`: one input of max(`--done`) items plus `--remaining-shards` shards, run into outputs that already
   hold `--done` of its items, finished by the project's own writer and manifest code (no job is run for
   them); each run annotates `--remaining-shards` shards' worth of items (`limit`), so input and work are the
   same at every level. Driver peak RSS and start-up: the seconds from `run_job` to the point where it builds
   the read (listing the input and the manifests, the plan, the lease, connecting to Ray), and to the first item
   annotated.
4. `listing`: `media.files.list_input` over a prefix of `--list-objects` objects.

The stand-in's seconds per item default to the generation stage's in a `flamingo-annotate bench` JSON
(`--bench`); `--item-seconds` sets them, e.g. so that the largest pool's capacity stays below the read side's
rate ("reading keeps up"). The table is printed, and with `--json FILE` written as JSON too.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import json
import multiprocessing
import os
import resource
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: the repository's packages, also in the spawned drivers

MODEL = "tiny-random"             # only its preprocessing is used: 32 px images; no weights are loaded
RESOURCE = "stand_in_gpu"
TASK = "name: rehearsal\nkind: generate\nquery: 'Caption:'\ngeneration: {max_new_tokens: 4}\n"
KEY, SECRET = "rehearsal-key", "rehearsal-secret"
RESUME_ITEM_SECONDS = 0.01        # the resume runs measure the driver, not the pool: their stand-in is quick


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result: dict[str, Any] = {}

    def save() -> None:  # after every step: a rehearsal stopped midway keeps what it measured
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1) + "\n")

    with s3_server(args.endpoint) as endpoint:
        rehearse(args, endpoint, result, save)
    print(format_table(result))
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="toy sizes: a test of the rehearsal itself")
    parser.add_argument("--pools", default="1,8,64", help="generation pool sizes, comma-separated")
    parser.add_argument("--done", default="0,100000,1000000", help="items already done, comma-separated")
    parser.add_argument("--items-per-shard", type=int, default=500, help="shards of the resume runs")
    parser.add_argument("--pool-shard-items", type=int, help="shards of the pool runs (default: one batch)")
    parser.add_argument("--remaining-shards", type=int, default=4, help="the work left in the resume runs")
    parser.add_argument("--list-objects", type=int, default=100_000)
    parser.add_argument("--nodes", type=int, default=4, help="worker nodes of the cluster")
    parser.add_argument("--gpus-per-node", type=int, default=16, help=f"units of '{RESOURCE}' per worker node")
    parser.add_argument("--batch-size", type=int, default=16, help="generation batch size")
    parser.add_argument("--batches-per-actor", type=int, default=4)
    parser.add_argument("--bench", default=str(ROOT / "docs/bench-cpu-2cores.json"))
    parser.add_argument("--item-seconds", type=float, help="stand-in seconds per item (default: --bench's)")
    parser.add_argument("--actor-mb", type=int, default=0, help="memory each generation stand-in holds")
    parser.add_argument("--endpoint", help="an S3 endpoint to use (default: a moto server started here)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    if args.small:  # toy sizes, for what was not set on the command line
        small = {"pools": "2", "done": "0,400", "items_per_shard": 50, "remaining_shards": 2, "list_objects": 300,
                 "nodes": 2, "gpus_per_node": 2, "batch_size": 8, "batches_per_actor": 3, "item_seconds": 0.05}
        for name, value in small.items():
            if getattr(args, name) == parser.get_default(name):
                setattr(args, name, value)
    args.pool_shard_items = args.pool_shard_items or args.batch_size
    if args.item_seconds is None:
        args.item_seconds = json.loads(Path(args.bench).read_text())["generation"]["seconds_per_item"]
    return args


# --- the rehearsal ----------------------------------------------------------------------------------------------

def rehearse(args: argparse.Namespace, endpoint: str, result: dict[str, Any], save: Any) -> None:
    """Fill `result` step by step, calling `save` after each."""
    import boto3
    from ray.cluster_utils import Cluster

    options = {"endpoint_url": endpoint, "key": KEY, "secret": SECRET}
    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=KEY, aws_secret_access_key=SECRET,
                          region_name="us-east-1")
    bucket = f"rehearsal-{secrets.token_hex(4)}"
    client.create_bucket(Bucket=bucket)
    work = Path(tempfile.mkdtemp(prefix="rehearsal-"))
    (work / "rehearsal.yaml").write_text(TASK)
    pools = [int(n) for n in args.pools.split(",") if n]  # none: no read and pool measurements
    shard = parquet_shard(args.items_per_shard)
    pool_items = max(pools, default=0) * args.batches_per_actor * args.batch_size
    pool_shards = -(-pool_items // args.pool_shard_items)
    pool_shard = parquet_shard(args.pool_shard_items)
    upload(client, bucket, {f"pool/{i:06d}.parquet": pool_shard for i in range(pool_shards)})
    result.update(settings={k: v for k, v in vars(args).items() if k != "endpoint"}, item_seconds=args.item_seconds,
                  pool_input={"shards": pool_shards, "items": pool_shards * args.pool_shard_items})
    # Ray's Cluster writes its address to $RAY_TMPDIR/ray/ray_current_cluster whatever the head's temp_dir,
    # and that folder need not exist on a fresh machine: this run gets one of its own for both (short, under
    # /tmp: Ray's socket paths must stay < 108 chars).
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    (ray_tmp / "ray").mkdir()
    os.environ["RAY_TMPDIR"] = str(ray_tmp)
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "include_dashboard": False, "object_store_memory": 512 * 2**20,
        "temp_dir": str(ray_tmp / "ray")})
    try:
        for _ in range(args.nodes):
            cluster.add_node(num_cpus=2, resources={RESOURCE: args.gpus_per_node},
                             object_store_memory=256 * 2**20)
        cluster.wait_for_nodes()
        base = {"address": cluster.address, "options": options, "task_file": str(work / "rehearsal.yaml"),
                "item_seconds": args.item_seconds, "batch_size": args.batch_size, "actor_mb": args.actor_mb}
        result["pools"] = []
        if pools:
            result["read"] = in_child(read_rate, {**base, "input": f"s3://{bucket}/pool/"})
            save()
        for n in pools:
            job = {**base, "input": f"s3://{bucket}/pool/", "output": f"s3://{bucket}/out-pool-{n}/",
                   "pool": n, "limit": n * args.batches_per_actor * args.batch_size}
            with StoreSampler(cluster.address) as store:
                run = in_child(drive, job)
            run.update(object_store_peak_mb=store.peak_mb, capacity_items_per_s=round(n / args.item_seconds, 2),
                       **output_figures(job["output"], options, n))
            result["pools"].append(run)
            save()
        result["resume"] = []
        levels = [int(d) for d in args.done.split(",") if d]
        if levels:  # one input for every level: only the items already done differ between the runs
            shards = max(levels) // args.items_per_shard + args.remaining_shards
            upload(client, bucket, {f"resume/{i:07d}.parquet": shard for i in range(shards)})
        for done in levels:
            result["resume"].append(resume_run(args, base, f"s3://{bucket}/resume/", done, options))
            save()
    finally:
        cluster.shutdown()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    if args.list_objects:
        result["listing"] = listing_time(client, bucket, args.list_objects, options)
        save()


def resume_run(args: argparse.Namespace, base: dict[str, Any], source: str, done: int,
               options: dict[str, Any]) -> dict[str, Any]:
    """A job over the whole input `source` into an output that already holds its first `done` items (whole
    shards, their manifests included), annotating `--remaining-shards` shards' worth of items (`limit`): the
    same input and the same work at every level; only what is already done differs."""
    from media.files import list_files

    done_shards = done // args.items_per_shard
    output = source.rstrip("/") + f"-out-{done}/"
    files = list_files(source, options)
    began = time.perf_counter()
    finished_output(output, base["task_file"], files[:done_shards], args.items_per_shard, options)
    built = time.perf_counter() - began
    run = in_child(drive, {**base, "input": source, "output": output, "pool": 2, "item_seconds": RESUME_ITEM_SECONDS,
                           "limit": args.remaining_shards * args.items_per_shard})
    return {"done_items": done_shards * args.items_per_shard, "done_shards": done_shards, "input_shards": len(files),
            "done_state_built_s": round(built, 1), **run}


def finished_output(output: str, task_file: str, files: list[Any], items_per_shard: int,
                    options: dict[str, Any]) -> None:
    """The output a run leaves once it finished `files`: their rows committed by the job's writer, and the
    manifests its tracker writes as each file's rows are committed (fed the reports read tasks send)."""
    import pyarrow as pa

    from pipeline.manifest import ManifestTracker, unit_uri
    from pipeline.schema import OUTPUT_SCHEMA
    from pipeline.task import load_tasks
    from pipeline.write import OutputWriter

    task = load_tasks([task_file])[0]
    run_id = "20260101T000000Z-000000"
    tracker = ManifestTracker(output, {task.name: task.sha256}, None, run_id, files, storage_options=options)
    writer = OutputWriter(output, run_id, storage_options=options, flush_rows=100_000,
                          before_commit=tracker.pull, after_commit=tracker.committed, watch=tracker.watch)
    names = [f.name for f in OUTPUT_SCHEMA if f.name not in ("created_at", "run_id")]
    for f in files:
        unit = unit_uri(f.uri)
        tracker.receive("opened", unit, {"retry": [], "stale": [], "prior": {}})
        row = {"source": unit, "task": task.name, "task_hash": task.sha256, "output_column": task.output_column,
               "model": "stand-in", "annotation": "done before", "score": 0.0, "seconds": 0.0}
        columns = {name: [row.get(name)] * items_per_shard for name in names}
        columns["id"] = [f"{unit}::{i:06d}" for i in range(items_per_shard)]
        writer.write(pa.table(columns, schema=pa.schema([OUTPUT_SCHEMA.field(n) for n in names])))
        tracker.receive("read", unit, {"rows": items_per_shard, "items": items_per_shard, "skipped": 0})
    writer.close()
    tracker.finish()


def listing_time(client: Any, bucket: str, count: int, options: dict[str, Any]) -> dict[str, Any]:
    """Seconds for `media.files.list_input` (what a run lists its input with) over `count` objects."""
    from media.files import list_input

    upload(client, bucket, {f"list/{i:07d}.png": b"x" for i in range(count)})
    seconds = []
    for _ in range(2):
        began = time.perf_counter()
        listed = len(list_input(f"s3://{bucket}/list/", options).files)
        seconds.append(time.perf_counter() - began)
    return {"objects": listed, "seconds": round(min(seconds), 2),
            "seconds_per_1000": round(1000 * min(seconds) / listed, 3)}


def output_figures(output: str, options: dict[str, Any], pool_size: int) -> dict[str, Any]:
    """The output's data files (count, sizes) and the stand-in pool's utilisation read from its rows."""
    import pyarrow.parquet as pq

    from media.storage import filesystem
    from pipeline.stand_in import busy_intervals, utilisation

    fs, root = filesystem(output, options)
    fs.invalidate_cache()
    sizes = {path: info["size"] for path, info in fs.find(root, detail=True).items()
             if path.endswith(".parquet") and "/_" not in path[len(root):]}
    annotations = [pq.read_table(path, columns=["annotation"], filesystem=fs).column("annotation")
                   for path in sizes]
    intervals: dict[str, list[tuple[float, float]]] = {}
    for column in annotations:
        for actor, spans in busy_intervals(column).items():
            intervals.setdefault(actor, []).extend(spans)
    steady = utilisation({actor: sorted(spans) for actor, spans in intervals.items()}, pool_size)
    mb = [size / 2**20 for size in sizes.values()]
    return {"output_files": len(mb), "output_mb_total": round(sum(mb), 2),
            "output_mb_median": round(statistics.median(mb), 3) if mb else None, **steady}


# --- in the drivers (spawned child processes) ------------------------------------------------------------------

def in_child(function: Any, job: dict[str, Any]) -> dict[str, Any]:
    """`function(job)` in a fresh spawned process: a driver of its own, whose peak memory is its own."""
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, job).result()


def drive(job: dict[str, Any]) -> dict[str, Any]:
    """One job with the stand-ins; the seconds to the read's construction and to the first annotated item."""
    import flamingo.factory  # noqa: F401  (imports paid before the clock starts, as in a warm command)
    import media.decode  # noqa: F401
    import pipeline.read
    from pipeline.job import JobConfig, StageResources, run_job
    from pipeline.stand_in import stand_in_actors
    from pipeline.task import load_tasks

    marks: dict[str, float] = {}
    read_items = pipeline.read.read_items

    def timed_read_items(*args: Any, **kwargs: Any) -> Any:
        marks.setdefault("read", time.perf_counter())
        return read_items(*args, **kwargs)

    pipeline.read.read_items = timed_read_items
    pool = job["pool"]
    config = JobConfig(
        load_tasks([job["task_file"]]), job["input"], job["output"], model=MODEL, address=job["address"],
        storage_options=job["options"], progress=False, limit=job.get("limit"),
        vision=StageResources(pool_size=max(1, pool // 16), batch_size=job["batch_size"], num_cpus=0.1),
        generation=StageResources(pool_size=pool, batch_size=job["batch_size"], num_cpus=0.01,
                                  resources={RESOURCE: 1}),
        actors=stand_in_actors(job["item_seconds"], ballast_mb=job["actor_mb"]))
    began, clock = time.perf_counter(), time.time()
    summary = run_job(config)
    wall = time.perf_counter() - began
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before reading the output back
    first_item = _first_start(job["output"], job["options"])
    return {"pool": pool, "items": summary.items, "rows_ok": summary.rows_ok, "rows_error": summary.rows_error,
            "skipped": summary.skipped, "wall_s": round(wall, 2),
            "items_per_s": round(summary.items / wall, 2) if wall else None,
            "startup_s": round(marks["read"] - began, 3) if "read" in marks else None,
            "first_item_s": round(first_item - clock, 2) if first_item else None,
            "driver_peak_rss_mb": round(peak_mb, 1)}


def _first_start(output: str, options: dict[str, Any]) -> float | None:
    """When the first stand-in batch of this run began (Unix seconds), from the output's rows."""
    import pyarrow.parquet as pq

    from media.storage import filesystem
    from pipeline.stand_in import busy_intervals

    fs, root = filesystem(output, options)
    fs.invalidate_cache()
    starts = []
    for path in fs.find(root):
        if path.endswith(".parquet") and "/_" not in path[len(root):]:
            column = pq.read_table(path, columns=["annotation"], filesystem=fs).column("annotation")
            starts += [spans[0][0] for spans in busy_intervals(column).values()]
    return min(starts) if starts else None


def read_rate(job: dict[str, Any]) -> dict[str, Any]:
    """Items/s of the read side alone (read tasks and decode tasks, no actors) over the pool input."""
    import ray

    from flamingo import image_preprocessing
    from media.decode import DecodeConfig
    from pipeline.decode import decode_items
    from pipeline.progress import quiet_ray
    from pipeline.read import read_items
    from pipeline.stage_stats import stage_rates

    quiet_ray("WARNING")
    ray.init(address=job["address"], log_to_driver=False)
    try:
        size, mean, std = image_preprocessing(MODEL)
        ds = decode_items(read_items(job["input"], storage_options=job["options"]).dataset,
                          DecodeConfig(size, mean, std))
        began = time.perf_counter()
        items = sum(len(batch) for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None))
        seconds = time.perf_counter() - began
        stages = stage_rates(ds)
    finally:
        ray.shutdown()
    # The read + decode stage's own rate (the rows it gave over its first start to last end): what the read side
    # supplies once running, Ray Data's start-up left out. (Its `items_per_second` counts the listed files in.)
    decode = stages[-1] if stages else {}
    span, rows = decode.get("span_s"), decode.get("rows_out")
    return {"items": items, "seconds": round(seconds, 2), "items_per_s": round(items / seconds, 1),
            "steady_items_per_s": round(rows / span, 1) if span and rows else None, "stages": stages}


# --- input, S3 and sampling -------------------------------------------------------------------------------------

def parquet_shard(items: int) -> bytes:
    """An img2dataset Parquet shard of `items` 8x8 PNGs (keys 000000, 000001, ...)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    png = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 90)).save(png, format="PNG")
    table = pa.table({"key": [f"{i:06d}" for i in range(items)], "jpg": [png.getvalue()] * items})
    out = io.BytesIO()
    pq.write_table(table, out)
    return out.getvalue()


def upload(client: Any, bucket: str, objects: dict[str, bytes]) -> None:
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda item: client.put_object(Bucket=bucket, Key=item[0], Body=item[1]), objects.items()))


class s3_server:  # noqa: N801  (used as a context manager, like a function)
    """`endpoint` as given, or a moto server started on 127.0.0.1 in its own process and stopped at the end."""

    def __init__(self, endpoint: str | None):
        self.endpoint = endpoint
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> str:
        if self.endpoint:
            return self.endpoint
        import socket

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.process = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1",
                                         "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.endpoint = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return self.endpoint
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("moto_server did not start in 30 s")

    def __exit__(self, *exc: object) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=30)


class StoreSampler:
    """The cluster's object store use, sampled every half second while the block runs; `peak_mb` after.
    Read through Ray's internal memory API (`ray._private.internal_api`; no public one without the dashboard),
    so a Ray upgrade may take it away: then the peak is None."""

    def __init__(self, address: str):
        self.address, self.peak_mb = address, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> StoreSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _sample(self) -> None:
        try:
            from ray._private.internal_api import get_memory_info_reply, get_state_from_address

            state = get_state_from_address(self.address)
            peak = 0
            while not self._stop.wait(0.5):
                peak = max(peak, get_memory_info_reply(state, timeout_seconds=10).store_stats.object_store_bytes_used)
                self.peak_mb = round(peak / 2**20, 1)
        except Exception as exc:
            print(f"object store not sampled: {type(exc).__name__}: {exc}", file=sys.stderr)


# --- the table --------------------------------------------------------------------------------------------------

def format_table(result: dict[str, Any]) -> str:
    lines = [f"stand-in: {result['item_seconds']:.4f} s per item"]
    if "read" in result:
        read = result["read"]
        lines += [f"read side alone: {read['items']} items in {read['seconds']} s, {read['items_per_s']} items/s "
                  f"with start-up, {_fmt(read['steady_items_per_s'])} items/s over the read stage's span"]
    if result.get("pools"):
        lines += ["", "actors  used  capacity/s  items/s  utilisation  window s  start spread s  store peak MB  "
                  "driver MB  files  MB total",
                  *(f"{p['pool']:>6}  {p['actors_used']:>4}  {p['capacity_items_per_s']:>10}  {p['items_per_s']:>7}  "
                    f"{_fmt(p['utilisation']):>11}  {p['window_s']:>8}  {_fmt(p.get('start_spread_s')):>14}  "
                    f"{_fmt(p['object_store_peak_mb']):>13}  "
                    f"{p['driver_peak_rss_mb']:>9}  {p['output_files']:>5}  {p['output_mb_total']:>8}"
                    for p in result["pools"])]
    if result.get("resume"):
        lines += ["", "done items  done shards  input shards  to do  start-up s  first item s  wall s  driver MB",
                  *(f"{r['done_items']:>10}  {r['done_shards']:>11}  {r['input_shards']:>12}  {r['items']:>5}  "
                    f"{_fmt(r['startup_s']):>10}  "
                    f"{_fmt(r['first_item_s']):>12}  {r['wall_s']:>6}  {r['driver_peak_rss_mb']:>9}"
                    for r in result["resume"])]
    if "listing" in result:
        listing = result["listing"]
        lines += ["", f"listing {listing['objects']} objects: {listing['seconds']} s "
                      f"({listing['seconds_per_1000']} s per 1000)"]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    return "-" if value is None else str(value)


if __name__ == "__main__":
    sys.exit(main())
