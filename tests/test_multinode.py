"""A job on a Ray cluster of several nodes (ray.cluster_utils.Cluster: real raylets on this machine), with a
worker node removed while the job runs: its read tasks and actors die mid-batch and Ray reschedules them on
the node that is left. The output must still hold exactly one row per item and task.

The cluster runs in a child process (a test session can hold one Ray connection, and this one must not be
the shared local instance), bounded by a timeout so that a hang fails the test instead of stalling CI.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pyarrow.parquet as pq
from sample_media import image_bytes

ROOT = Path(__file__).resolve().parents[1]
ITEMS = 48

TASK = """name: colour
kind: classify
demonstrations:
  - {media: demo_red.png, text: " red"}
labels: [" red", " blue", " green"]
query: "Colour:"
"""

# The child: a head that runs no work (num_cpus=0) and two workers with 2 logical CPUs each, so the node
# left after the removal still fits both actor pools (0.5 CPU each) and the read tasks.
CHILD = textwrap.dedent("""
    import json, sys, threading, time
    import ray
    from ray.cluster_utils import Cluster
    from pipeline.job import JobConfig, StageResources, run_job
    from pipeline.task import load_tasks

    task_file, input_dir, output_dir, events_file, ray_dir = sys.argv[1:6]

    def record(event):
        # A file of its own: Ray prints a dead raylet's log tail to stdout, on the same line as anything else.
        with open(events_file, "a") as f:
            f.write(json.dumps(event) + "\\n")
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": False, "temp_dir": ray_dir})
    workers = [cluster.add_node(num_cpus=2) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False

    def remove_a_worker_once_work_runs():
        # Once the pools' actors are up, the worker node that holds one of them goes away. (The actor
        # table is read from the GCS: the public state API needs the dashboard, which is not installed.)
        from ray._private import state
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            nodes = [a["Address"]["NodeID"] for a in state.actors().values()
                     if a["State"] == "ALIVE" and "MapWorker" in a["ActorClassName"]]
            victim = next((w for w in workers if w.node_id in nodes), None)
            if victim is not None:
                time.sleep(1.0)   # let it take a batch
                cluster.remove_node(victim, allow_graceful=False)
                record({"removed": victim.node_id, "actors_there": nodes.count(victim.node_id)})
                return
            time.sleep(0.2)

    remover = threading.Thread(target=remove_a_worker_once_work_runs, daemon=True)
    remover.start()
    config = JobConfig(load_tasks([task_file]), input_dir, output_dir, model="tiny-random", progress=False,
                       vision=StageResources(batch_size=4), generation=StageResources(batch_size=4))
    summary = run_job(config)
    remover.join(timeout=5)
    record({"rows_ok": summary.rows_ok, "rows_error": summary.rows_error})
    ray.shutdown()
    cluster.shutdown()
""")


def test_a_node_removed_mid_job_loses_and_repeats_nothing(tmp_path):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "demo_red.png").write_bytes(image_bytes((220, 20, 20)))
    (tasks / "colour.yaml").write_text(TASK)
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(ITEMS):
        (inputs / f"{i:03d}.png").write_bytes(image_bytes((i * 5 % 256, 100, 200 - i * 3)))
    out = tmp_path / "out"
    events_file = tmp_path / "events.jsonl"
    # Ray's Cluster writes its address to $RAY_TMPDIR/ray/ray_current_cluster whatever the head's temp_dir,
    # and /tmp/ray need not exist on a fresh machine: the child gets a folder of its own for both.
    # (Short, under /tmp: Ray's socket paths must stay < 108 chars.)
    ray_tmp = Path(tempfile.mkdtemp(prefix="fa-mn-", dir="/tmp"))
    (ray_tmp / "ray").mkdir()
    try:
        result = subprocess.run([sys.executable, "-c", CHILD, str(tasks / "colour.yaml"), str(inputs), str(out),
                                 str(events_file), str(ray_tmp / "ray")],
                                cwd=ROOT, env={**_env(), "PYTHONPATH": str(ROOT), "RAY_TMPDIR": str(ray_tmp)},
                                capture_output=True, text=True, timeout=420)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    events = [json.loads(line) for line in events_file.read_text().splitlines()]
    assert any("removed" in e for e in events), result.stdout      # the fault did happen, mid-job
    assert {"rows_ok": ITEMS, "rows_error": 0} in events           # and the job's own count agrees

    rows = pq.read_table(out).to_pandas()
    assert len(rows) == ITEMS and rows.id.is_unique
    assert set(rows.id) == {str(inputs / f"{i:03d}.png") for i in range(ITEMS)}
    assert rows.error.isna().all(), rows.error.dropna().unique()


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
