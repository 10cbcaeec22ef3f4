"""One annotation job: read -> decode -> encode (vision actors) -> generate (LM actors) -> write.

`JobConfig` is everything a run needs, the tasks already loaded and validated (`pipeline.task.load_tasks`):
the commands build one and call `run_job`. Before Ray starts, `run_job` lists the input and takes the output's
lease (pipeline/lease.py), so a typo, unreachable storage or a second run on the same output is one line of
error (`JobError`) within seconds. Storage calls to S3 get bounded timeouts and retries
(`media.storage.S3_CLIENT_CONFIG`) unless the options set their own.

Resume (pipeline/manifest.py; rules in pipeline/write.py): input files with a manifest for these tasks are not
read again; the others are, and their read tasks leave out, on the workers, the items the output holds for
every task (same task name and file hash); items done for only some tasks are annotated for the others only,
so a re-run never writes a duplicate row. Error rows of kind `transient` (and with `retry_errors`, all error
rows) are re-attempted, and the rows they supersede are removed at the end. The driver holds per-file state
only, never item ids.

The summary counts the rows this run wrote itself (`WriteStats`), never the output as a whole.

Control and record (pipeline/plan.py, pipeline/progress.py, pipeline/runs.py): before Ray starts, the finished
input files are taken from their manifests (listed while the input is); when nothing is left the run returns at
once, without Ray or the model (`JobSummary.nothing_to_do`). The unfinished shards' items (a Parquet footer or a
tar's member headers each) are counted on a thread beside the job, which gives the progress line its total
when done: start-up does not wait for a read per shard. `plan_job` counts them all first (`--dry-run`).
`sample` and `limit` narrow what a run reads; and a run that took the lease leaves `_runs/<run_id>.json` in the
output, also when it fails or is stopped.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import threading
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from flamingo import DEFAULT_MODEL
from media.errors import describe_error
from media.files import DEFAULT_MAX_ITEM_BYTES, ListedFile, Listing, is_container
from media.storage import resolve_storage_options
from pipeline import plan as plan_module
from pipeline import runs
from pipeline.progress import ProgressLine, quiet_ray
from pipeline.task import Task

if TYPE_CHECKING:
    import pyarrow as pa

    from media.decode import DecodeConfig
    from pipeline.lease import Lease
    from pipeline.manifest import UnitState

# botocore settings for S3 (s3fs `config_kwargs`): an unreachable endpoint fails in seconds, not minutes.
EXIT_FAILED = 1           # the job could not start or stopped (one-line reason)
EXIT_TRANSIENT = 3        # the job finished, but items failed with transient storage errors: run it again
EXIT_OUTPUT_BUSY = 4      # another live run holds the output's lease


class JobError(Exception):
    """A problem reported as one line (no traceback), with the exit status the command ends with."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class StageResources:
    """Ray resources for one actor pool. Fractional CPUs by default: on small machines actors that
    claim whole cores starve the read tasks and the job stalls at 'backpressured'. With `max_pool_size`
    the pool autoscales between `pool_size` and it (Ray Data adds actors while their input queues up)."""

    pool_size: int = 1
    max_pool_size: int | None = None  # None: a fixed pool of `pool_size` actors
    batch_size: int = 16
    num_cpus: float = 0.5
    num_gpus: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources per actor, e.g. {"tpu": 1}


def default_generation_resources() -> StageResources:
    """Decoding reads every weight once per step whatever the batch, so larger batches are nearly free
    per item (measured on 2 CPU cores: 8 -> 64 items cut the cost per item by about 3x, and 64 -> 128 raised
    generation items/s by 1.15x in float32 and 1.42x in bfloat16; 256 gained little more: jobs/measure_batch_sizes.py,
    README's Speed)."""
    return StageResources(batch_size=128)


@dataclass
class JobSummary:
    """Counted from the rows this run wrote (no re-listing of the output)."""

    items: int            # items this run wrote rows for (resumed ones excluded)
    rows_ok: int
    rows_error: int
    skipped: int          # items already present in the output (resume)
    seconds: float
    output: str
    run_id: str = ""
    rows_error_by_kind: Mapping[str, int] = field(default_factory=dict)  # error_kind -> rows
    transient_items: int = 0   # items with a transient error row: a re-run tries them again
    superseded: int = 0        # earlier error rows this run replaced (and removed from the output)
    nothing_to_do: str = ""    # when the output already held everything: why (Ray and the model never started)
    sidecars: int = 0          # producers' sidecar files the listing left out (media.files.sidecar_files)

    @property
    def items_per_second(self) -> float:
        return self.items / self.seconds if self.seconds > 0 else 0.0


@dataclass
class JobConfig:
    tasks: tuple[Task, ...]                  # loaded and validated; names unique
    input_uri: str
    output_uri: str
    model: str = DEFAULT_MODEL
    trust_remote_code: bool = False          # the model's own code may run (never taken from its files)
    address: str | None = None               # None: start (and stop) a local Ray instance
    vision: StageResources = field(default_factory=StageResources)
    generation: StageResources = field(default_factory=default_generation_resources)
    num_frames: int | None = None            # video: frames per clip (overrides the task files)
    fps: float | None = None                 # video: sample at this rate instead of evenly
    max_item_bytes: int = DEFAULT_MAX_ITEM_BYTES  # larger items become error rows, never OOM a worker
    storage_options: dict = field(default_factory=dict)  # fsspec options (endpoint_url, key, secret, ...)
    progress: bool = True
    device: str | None = None                # None: cuda when the actor got a GPU, else cpu
    dtype: str = "auto"                      # both pools' model dtype (flamingo.dtypes): auto is bf16 on CUDA
    force: bool = False                      # take the output's lease even from a live run
    retry_errors: bool = False               # re-attempt every error row, not only transient ones
    flush_rows: int | None = None            # commit an output file every N rows (None: pipeline.write's default)
    flush_seconds: float | None = None       # ... or every T seconds, whichever comes first
    target_file_mb: float | None = None      # merge the run's files into files of ~N MB (None: pipeline.write's)
    limit: int | None = None                 # annotate at most this many new items (a re-run continues)
    sample: float | None = None              # only the items whose id hashes below this fraction (pipeline.plan)
    log_level: str = "WARNING"               # Ray's console output: INFO or DEBUG shows Ray's own (progress.py)
    keep_columns: tuple[str, ...] | None = None  # input metadata kept as output columns (None: `key` for shards)
    media_keys: tuple[str, ...] | None = None    # WebDataset media extensions by preference (None: first member)
    include_sidecars: bool = False           # list producers' sidecar files (`_stats.json`, ...) as items too
    # As media.decode.DecodeConfig's defaults (not imported here: it loads the decoders).
    max_pixels: int = 50_000_000             # larger pictures (width x height) are error rows, read from headers
    decode_timeout_s: float = 60.0           # an item that takes longer to decode is an error row
    # These files (URIs, as `input_uri` would list them) are the input instead of listing `input_uri`: a gold
    # set names its items one by one (flamingo_annotate/gold.py).
    input_files: tuple[str, ...] = ()
    # The (vision, generation) actor classes; None: pipeline.encode.VisionEncoder and pipeline.generate.Annotator.
    # Set only by the scale rehearsal (jobs/scale_rehearsal.py), whose stand-ins (pipeline/stand_in.py) keep the
    # real classes' row handling and replace the model by a timed sleep. No command exposes it.
    actors: tuple[type, type] | None = None


def actor_pool(resources: StageResources) -> Any:
    """The Ray Data compute strategy of a pool: fixed, or autoscaling from `pool_size` to `max_pool_size`."""
    import ray.data

    if resources.max_pool_size is None or resources.max_pool_size == resources.pool_size:
        return ray.data.ActorPoolStrategy(size=resources.pool_size)
    return ray.data.ActorPoolStrategy(min_size=resources.pool_size, max_size=resources.max_pool_size)


def _custom_resources(resources: StageResources) -> dict[str, Any]:
    """map_batches' keyword for a pool's custom resources; none when it has none (Ray's default)."""
    return {"resources": dict(resources.resources)} if resources.resources else {}


def new_run_id() -> str:
    """`YYYYMMDDTHHMMSSZ-xxxxxx`: sorts by start time; the random suffix tells apart runs of the same second."""
    return f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def video_sampling(tasks: Sequence[Task], config: JobConfig) -> tuple[int, float | None]:
    """(num_frames, fps) for video items. Items are decoded once for all tasks, so the tasks must
    agree, unless the job sets the frame count itself."""
    settings = {(t.video.num_frames, t.video.fps) for t in tasks}
    if len(settings) > 1 and config.num_frames is None:
        detail = ", ".join(f"{t.name}: num_frames={t.video.num_frames} fps={t.video.fps}" for t in tasks)
        raise ValueError(f"tasks sample videos differently ({detail}); make them agree or pass --num-frames")
    task_frames, task_fps = next(iter(settings)) if len(settings) == 1 else (None, None)
    num_frames = config.num_frames or task_frames
    if num_frames is None:
        raise ValueError("a job needs at least one task")
    return num_frames, config.fps if config.fps is not None else task_fps


def run_job(config: JobConfig) -> JobSummary:
    """Run the job; raises JobError for what is reported as one line (see the module docstring)."""
    from pipeline.kept_columns import DEFAULT_KEEP_COLUMNS
    from pipeline.lease import Lease, LeaseHeld
    from pipeline.manifest import finished_units

    start = time.perf_counter()
    tasks = config.tasks
    num_frames, fps = video_sampling(tasks, config)  # before any work
    _check_options(config)
    in_options = resolve_storage_options(config.input_uri, config.storage_options)
    out_options = resolve_storage_options(config.output_uri, config.storage_options)
    # The output's manifests are listed while the input is: at scale both are long listings, and neither
    # needs the other (a manifest is matched to a listed file by its name).
    with ThreadPoolExecutor(1) as pool:
        manifests = pool.submit(_list_manifests, config, out_options)
        listing = _list_input(config.input_uri, in_options, config.include_sidecars, config.input_files)
    files = listing.files
    if config.keep_columns is None:  # the producer's key, when the input has shards that have keys
        config = dataclasses.replace(config, keep_columns=DEFAULT_KEEP_COLUMNS if any(
            is_container(f.uri) for f in files) else ())
    try:
        finished = finished_units(files, manifests.result())
    except Exception as exc:  # the output does not answer: the run could not write there either
        raise JobError(f"cannot write to output {config.output_uri}: {describe_error(exc)}") from None
    done = _nothing_to_do_before_lease(config, files, in_options, finished)
    if done is not None:  # before the model library is even imported (torch takes seconds)
        done.seconds = time.perf_counter() - start
        return done
    from flamingo import image_preprocessing
    from flamingo.dtypes import check_dtype
    from flamingo.factory import check_model
    from media.decode import DecodeConfig

    try:  # an unknown model, or one whose folder asks to run code, stops here rather than in every actor
        check_model(config.model, trust_remote_code=config.trust_remote_code)
        check_dtype(config.dtype)
    except ValueError as error:
        raise JobError(str(error)) from None
    image_size, mean, std = image_preprocessing(config.model)
    run_id = new_run_id()
    try:
        lease = Lease(config.output_uri, run_id, storage_options=out_options, force=config.force)
        lease.acquire()
    except LeaseHeld as held:
        raise JobError(str(held), EXIT_OUTPUT_BUSY) from None
    except Exception as exc:
        raise JobError(f"cannot write to output {config.output_uri}: {describe_error(exc)}") from None
    record = runs.new_record(config, run_id, files)
    seen: dict[str, Any] = {}  # what the run found out before it ended (runs.finish's keywords)
    try:
        decode = DecodeConfig(image_size, mean, std, num_frames=num_frames, fps=fps, max_pixels=config.max_pixels,
                              timeout_s=config.decode_timeout_s)
        summary = _run_with_lease(config, run_id, lease, decode, files, finished, in_options, out_options, seen)
        summary.seconds = time.perf_counter() - start
        _write_record(runs.finish(record, runs.COMPLETE, summary.seconds, summary=summary, **seen),
                      config.output_uri, out_options)
    except BaseException as error:
        stopped = isinstance(error, KeyboardInterrupt)
        reason = "interrupted" if stopped else str(error) if isinstance(error, JobError) else describe_error(error)
        reason = (reason.splitlines() or [""])[0]
        _write_record(runs.finish(record, runs.STOPPED if stopped else runs.FAILED, time.perf_counter() - start,
                                  reason=reason), config.output_uri, out_options)
        raise
    finally:
        lease.release()
    summary.sidecars = len(listing.sidecars)
    return summary


def _run_with_lease(config: JobConfig, run_id: str, lease: Lease, decode: DecodeConfig, files: list[ListedFile],
                    finished: dict[str, UnitState], in_options: dict[str, Any], out_options: dict[str, Any],
                    seen: dict[str, Any]) -> JobSummary:
    """The run itself, holding the lease. `finished` (listed URI -> manifest) comes from the manifests listed
    before the lease was taken and is not listed again: manifests only spare whole files a read. What the
    output holds is found after the lease, from its files' footers (`unit_files`), and the read tasks leave those
    items out; so a file that another run finished in between is read again and gives no rows."""
    import ray
    from ray.util.annotations import RayDeprecationWarning
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from pipeline.annotator_spec import AnnotatorSpec
    from pipeline.decode import decode_items
    from pipeline.encode import VisionEncoder
    from pipeline.generate import Annotator
    from pipeline.lease import LeaseLost
    from pipeline.manifest import ManifestTracker, UnitLedger, unit_uri
    from pipeline.read import Resume, read_items
    from pipeline.stage_stats import stage_rates
    from pipeline.write import OutputWriteError, WriteStats, drop_rows, unit_files, write_rows

    tasks = config.tasks
    task_hashes = {t.name: t.sha256 for t in tasks}
    # Something is left to do (`_nothing_to_do_before_lease` looked at the same manifests); this plan counts no
    # shard: the progress line's total comes from `_count_total`, beside the job.
    plan = _plan(config, files, in_options, finished, count=False)
    # Finished files are not read at all; the others are, and their read tasks leave out what the output holds.
    reopened = {uri: state for uri, state in finished.items() if state.retryable(config.retry_errors)}
    to_read = [f for f in files if f.uri not in finished or f.uri in reopened]
    if config.sample is not None:  # plain files outside the sample are not even read (their id is their URI)
        to_read = [f for f in to_read if is_container(f.uri) or plan_module.in_sample(f.uri, config.sample)]
    skipped = sum(state.items for uri, state in finished.items() if uri not in reopened)
    try:  # the output files that hold each file's rows, from their footers
        by_unit, unknown = unit_files(config.output_uri, {unit_uri(f.uri) for f in to_read}, out_options,
                                      finish_rewrites=True)
    except Exception as exc:
        raise JobError(f"cannot read output {config.output_uri}: {describe_error(exc)}") from None
    annotator = AnnotatorSpec(
        model=config.model, trust_remote_code=config.trust_remote_code, tasks=tuple(tasks), device=config.device,
        dtype=config.dtype,
        storage_options={t.name: resolve_storage_options(t.path, config.storage_options) for t in tasks})
    writer_options: dict[str, Any] = {"flush_rows": config.flush_rows, "flush_seconds": config.flush_seconds,
                                      "keep_columns": config.keep_columns}
    if config.target_file_mb is not None:
        writer_options["target_file_bytes"] = int(config.target_file_mb * 1024 * 1024)
    writer_options = {key: value for key, value in writer_options.items() if value is not None}

    started_ray = not ray.is_initialized()
    # A fresh local instance that this process starts (no address given, none in RAY_ADDRESS) is one machine:
    # an actor that dies there stops the job (what was committed stays; a re-run resumes) rather than restart
    # forever on the batch that killed it. Anywhere else nodes come and go, and Ray Data's own fault tolerance
    # stays (bounded task retries there fail a job that loses a node: the restarting actor is "unavailable").
    # Ray logs an error line for every restartable actor pool, as its constructor lives in the object store.
    local = started_ray and config.address is None and not os.environ.get("RAY_ADDRESS")
    quiet_ray(config.log_level)
    if started_ray:
        ray.init(address=config.address, include_dashboard=False, log_to_driver=False,
                 ignore_reinit_error=True, logging_level=logging.getLevelName(config.log_level))
    restarts: dict[str, Any] = {"max_restarts": 0} if local else {}
    progress = ProgressLine(plan.to_do) if config.progress else None
    counting = threading.Event()  # set: the count of the unfinished files' items may stop
    if progress is not None and plan.uncounted:
        threading.Thread(target=_count_total, args=(config, files, in_options, finished, progress, counting),
                         name="count-items", daemon=True).start()
    ledger: Any = None
    encoder_class, annotator_class = config.actors or (VisionEncoder, Annotator)
    try:
        # On the driver's node: a worker node that goes away must not take the reports with it.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        ledger = ray.remote(UnitLedger).options(num_cpus=0, max_restarts=0, scheduling_strategy=here).remote()
        tracker = ManifestTracker(config.output_uri, task_hashes, config.sample, run_id, to_read, ledger=ledger,
                                  previous=reopened, storage_options=out_options)
        resume = Resume(config.output_uri, task_hashes, out_options, config.retry_errors, by_unit, unknown, ledger)
        ds = read_items(config.input_uri, storage_options=in_options, max_item_bytes=config.max_item_bytes,
                        files=to_read, media_keys=config.media_keys, metadata_fields=config.keep_columns,
                        resume=resume, sample=config.sample).dataset
        if config.limit is not None:
            ds = ds.limit(config.limit)
        ds = decode_items(ds, decode)
        with warnings.catch_warnings():  # Ray 2.60 has no named parameter for actor restarts, and warns
            warnings.simplefilter("ignore", RayDeprecationWarning)
            ds = ds.map_batches(
                encoder_class, fn_constructor_kwargs={"model": config.model, "device": config.device,
                                                      "trust_remote_code": config.trust_remote_code,
                                                      "dtype": config.dtype},
                batch_format="pyarrow", batch_size=config.vision.batch_size,
                compute=actor_pool(config.vision),
                num_cpus=config.vision.num_cpus, num_gpus=config.vision.num_gpus,
                **_custom_resources(config.vision), **restarts)
            ds = ds.map_batches(
                annotator_class, fn_constructor_args=(annotator,),
                batch_format="pyarrow", batch_size=config.generation.batch_size,
                compute=actor_pool(config.generation),
                num_cpus=config.generation.num_cpus, num_gpus=config.generation.num_gpus,
                **_custom_resources(config.generation), **restarts)
        # The driver commits files as rows stream in: a job killed midway keeps what it committed (resume).
        batches = ds.iter_batches(batch_format="pyarrow", batch_size=None)
        if progress is not None:
            progress.start()
            batches = _counted(batches, progress)

        def before_commit() -> None:  # the lease, then the read tasks' reports (pipeline/manifest.py)
            lease.confirm()
            tracker.pull()

        tracker.stats = WriteStats()
        stats = write_rows(batches, config.output_uri, run_id, storage_options=out_options, watch=tracker.watch,
                           before_commit=before_commit, after_commit=tracker.committed, stats=tracker.stats,
                           **writer_options)
        tracker.finish()  # manifests of the files whose rows are all committed
        superseded = drop_rows(config.output_uri, tracker.superseded(stats.written_keys), run_id, task_hashes,
                               storage_options=out_options)
        tracker.write_dirty()  # ... and of those whose superseded error rows are gone now
        seen["stages"] = stage_rates(ds)
    except (LeaseLost, OutputWriteError) as exc:
        raise JobError(str(exc)) from None
    finally:
        counting.set()
        if progress is not None:
            progress.close()
        if ledger is not None and not started_ray:
            ray.kill(ledger)
        if started_ray:
            ray.shutdown()
    skipped += tracker.skipped
    seen.update(items_seen=skipped + stats.item_count,
                read_all=config.limit is None or stats.item_count < config.limit)
    return JobSummary(items=stats.item_count, rows_ok=stats.rows_ok, rows_error=stats.rows_error,
                      skipped=skipped, seconds=0.0, output=config.output_uri, run_id=run_id,
                      rows_error_by_kind=dict(stats.rows_by_kind), transient_items=stats.transient_count,
                      superseded=superseded)


def _list_input(uri: str, options: Mapping[str, Any], include_sidecars: bool = False,
                files: Sequence[str] = ()) -> Listing:
    """List the input once, before anything starts: a typo or unreachable storage becomes one line. Explicit
    `files` are taken as they are (a missing one becomes an error row when it is read)."""
    from media.files import NoInputFiles, list_input

    if files:
        return Listing([ListedFile(f, None) for f in sorted(set(files))], [])
    try:
        return list_input(uri, options, include_sidecars=include_sidecars)
    except NoInputFiles as error:
        raise JobError(str(error)) from None
    except FileNotFoundError:
        raise JobError(f"no input files match {uri}") from None
    except Exception as exc:
        raise JobError(f"cannot list input {uri}: {describe_error(exc)}") from None


def _check_options(config: JobConfig) -> None:
    """The options that can clash with the tasks, checked the same way by a run and by its dry run."""
    from media.files import parse_media_keys
    from pipeline.kept_columns import check_keep_columns

    try:
        check_keep_columns(config.keep_columns or (), [t.output_column for t in config.tasks])
        if config.media_keys is not None:
            parse_media_keys(";".join(config.media_keys))
    except ValueError as error:
        raise JobError(str(error)) from None


def plan_job(config: JobConfig) -> plan_module.JobPlan:
    """What `run_job(config)` would do, found without Ray, the model or the lease, writing nothing: the input
    listed and its unfinished files' items counted, the output checked writable (a probe written and deleted)
    and its manifests listed.
    Raises JobError for what would stop the run (a bad model, input or output)."""
    from flamingo.dtypes import check_dtype
    from flamingo.factory import check_model

    video_sampling(config.tasks, config)
    _check_options(config)
    try:
        check_model(config.model, trust_remote_code=config.trust_remote_code)
        check_dtype(config.dtype)
    except ValueError as error:
        raise JobError(str(error)) from None
    in_options = resolve_storage_options(config.input_uri, config.storage_options)
    out_options = resolve_storage_options(config.output_uri, config.storage_options)
    files = _list_input(config.input_uri, in_options, config.include_sidecars, config.input_files).files
    try:
        plan_module.check_writable(config.output_uri, out_options)
    except Exception as exc:
        raise JobError(f"cannot write to output {config.output_uri}: {describe_error(exc)}") from None
    try:
        finished = _finished(config, files, out_options)
    except Exception as exc:
        raise JobError(f"cannot read output {config.output_uri}: {describe_error(exc)}") from None
    return _plan(config, files, in_options, finished)


def _list_manifests(config: JobConfig, out_options: Mapping[str, Any]) -> dict[str, UnitState]:
    """Unit key -> the newest manifest of this job's task set and sample in the output (names only)."""
    from pipeline.manifest import list_manifests, manifest_folder

    fs, folder = manifest_folder(config.output_uri, {t.name: t.sha256 for t in config.tasks}, config.sample,
                                 out_options)
    return list_manifests(fs, folder)


def _finished(config: JobConfig, files: Sequence[ListedFile], out_options: Mapping[str, Any]) -> dict[str, UnitState]:
    """Listed URI -> manifest, for the listed files the output has a manifest of, for these tasks and sample."""
    from pipeline.manifest import finished_units

    return finished_units(files, _list_manifests(config, out_options))


def _plan(config: JobConfig, files: Sequence[ListedFile], in_options: Mapping[str, Any],
          finished: Mapping[str, UnitState], *, count: bool = True,
          stop: threading.Event | None = None) -> plan_module.JobPlan:
    """The plan; only the files without a manifest are counted (a finished file's count is in its manifest).
    Without `count`, only what the listing tells is counted (a plain file is one item; shards stay uncounted):
    what deciding whether there is anything to do needs, at no cost per shard."""
    from media.count import FileCount, count_items, file_kind

    unfinished = [f for f in files if f.uri not in finished]
    counted = {c.uri: c for c in count_items(unfinished, in_options, read=count, stop=stop)}
    counts = [counted.get(f.uri) or FileCount(f.uri, file_kind(f.uri), finished[f.uri].items) for f in files]
    return plan_module.make_plan(config.input_uri, counts, finished, [t.name for t in config.tasks],
                                 retry_errors=config.retry_errors, sample=config.sample, limit=config.limit)


def _count_total(config: JobConfig, files: Sequence[ListedFile], in_options: Mapping[str, Any],
                 finished: Mapping[str, UnitState], progress: ProgressLine, stop: threading.Event) -> None:
    """Count the unfinished shards' items (a footer or the member headers each) and give the progress line its
    total; on a thread beside the job, which never waits for it: at 10^5 shards the count takes minutes."""
    plan = _plan(config, files, in_options, finished, stop=stop)
    if not stop.is_set():
        progress.total = plan.to_do


def _nothing_to_do_before_lease(config: JobConfig, files: Sequence[ListedFile], in_options: Mapping[str, Any],
                                finished: Mapping[str, UnitState]) -> JobSummary | None:
    """The nothing-to-do summary, found from the manifests of the finished files (`finished`) before the model is
    checked and without the lease (a read-only look); else None (the run goes on)."""
    sample = config.sample
    if any(f.uri not in finished for f in files if sample is None or is_container(f.uri)
           or plan_module.in_sample(f.uri, sample)):
        return None  # some file is left to read: no need to count anything here
    plan = _plan(config, files, in_options, finished)
    return _nothing_to_do(config, plan) if plan_module.nothing_to_do(plan) else None


def _nothing_to_do(config: JobConfig, plan: plan_module.JobPlan) -> JobSummary:
    what = f"all {plan.items} items" if plan.items is not None else f"every item of the {plan.files} files"
    return JobSummary(items=0, rows_ok=0, rows_error=0, skipped=plan.done_ids, seconds=0.0,
                      output=config.output_uri, nothing_to_do=(
                          f"{what} of {config.input_uri} are in {config.output_uri} for every task "
                          f"({', '.join(t.name for t in config.tasks)}), and no error rows to retry"))


def _counted(batches: Iterable[pa.Table], progress: ProgressLine) -> Iterator[pa.Table]:
    """`batches` as they are, counting the items whose rows they hold."""
    for batch in batches:
        progress.update(len(set(batch.column("id").to_pylist())))
        yield batch


def _write_record(record: dict[str, Any], output_uri: str, options: Mapping[str, Any]) -> None:
    """Write the run record; a failure to do so is a warning, never the run's failure."""
    try:
        runs.write_record(output_uri, record, options)
    except Exception as exc:
        logging.getLogger(__name__).warning("could not write the run record: %s", describe_error(exc))
