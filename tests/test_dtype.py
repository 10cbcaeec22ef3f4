"""The model's dtype through the whole job: `auto` per device, bfloat16 tokens that reach the generation actor
as bfloat16 (not upcast), float32 tokens that arrive exactly, one-line errors for unknown dtypes, and a real
Ray run in bfloat16 with an autoscaling vision pool."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from sample_media import image_bytes

import flamingo
from flamingo.dtypes import resolve_dtype
from flamingo_annotate.cli import main
from flamingo_annotate.options import PoolSize, parse_pool_size
from media.decode import DecodeConfig, pixels_array
from media.normalize import normalize
from pipeline.decode import decode_batch
from pipeline.encode import VisionEncoder, visual_tensor
from pipeline.generate import Annotator, AnnotatorSpec
from pipeline.job import JobConfig, JobError, StageResources, actor_pool, run_job
from pipeline.task import load_task

MODEL = "tiny-random"
TASK = """name: caption
kind: generate
demonstrations:
  - {media: demo.png, text: "a red shape."}
query: "Output:"
generation: {max_new_tokens: 4}
"""


@pytest.fixture(scope="module")
def task_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("task")
    (folder / "demo.png").write_bytes(image_bytes((220, 20, 20)))
    (folder / "caption.yaml").write_text(TASK)
    return folder / "caption.yaml"


def decoded_batch(colours) -> pa.Table:
    """Rows as the decode stage gives them to the vision actors, for solid-colour images."""
    c = flamingo.load_model(MODEL).config
    rows = pa.table({"id": [f"item{i}" for i in range(len(colours))], "source": ["test"] * len(colours),
                     "media_kind": ["image"] * len(colours), "data": [image_bytes(col) for col in colours],
                     "error": pa.array([None] * len(colours), pa.string())})
    return decode_batch(rows, DecodeConfig(c.image_size, c.image_mean, c.image_std))


def model_input(row, config, dtype: torch.dtype) -> torch.Tensor:
    """A decoded row's uint8 pixels normalised as the vision actor does, in `dtype`."""
    array = pixels_array(row["pixels"], row["pixels_shape"]).copy()
    return normalize(torch.from_numpy(array), config.image_mean, config.image_std, dtype)


def test_auto_resolves_per_device_and_names_are_checked():
    assert resolve_dtype("auto", "cpu") is torch.float32
    assert resolve_dtype("auto", "cuda") is torch.bfloat16
    assert resolve_dtype(None, torch.device("cuda", 1)) is torch.bfloat16
    assert resolve_dtype("float16", "cpu") is torch.float16
    with pytest.raises(ValueError, match=r"^unknown dtype 'float8': choose one of auto, float32, bfloat16, float16$"):
        resolve_dtype("float8", "cpu")


def test_bfloat16_tokens_reach_the_generation_actor_as_bfloat16(task_file):
    batch = decoded_batch([(200, 30, 30), (30, 200, 30)])
    encoded = VisionEncoder(MODEL, device="cpu", dtype="bfloat16")(batch)
    assert encoded.column("visual_dtype").to_pylist() == ["bfloat16", "bfloat16"]
    row = encoded.slice(0, 1).to_pylist()[0]
    tokens = visual_tensor(row["visual"], row["visual_shape"], row["visual_dtype"])
    assert tokens.dtype is torch.bfloat16 and len(row["visual"]) == 2 * tokens.numel()  # 2 bytes a value

    model = flamingo.load_model(MODEL, dtype="bfloat16")
    x = model_input(decoded_batch([(200, 30, 30)]).to_pylist()[0], model.config, torch.bfloat16)
    with torch.inference_mode():
        expected = model.encode_vision(x[None, None])[0, 0]
    assert torch.equal(tokens, expected)   # the bits the vision actor computed, none lost on the way

    annotator = Annotator(AnnotatorSpec(MODEL, False, (load_task(task_file),), device="cpu", dtype="bfloat16"))
    assert annotator.model.dtype is torch.bfloat16
    rows = annotator(encoded).to_pylist()
    assert [r["error"] for r in rows] == [None, None] and all(r["annotation"] is not None for r in rows)


def test_float32_tokens_arrive_exactly():
    encoded = VisionEncoder(MODEL, device="cpu", dtype="float32")(decoded_batch([(10, 90, 200)]))
    row = encoded.to_pylist()[0]
    tokens = visual_tensor(row["visual"], row["visual_shape"], row["visual_dtype"])
    model = flamingo.load_model(MODEL)
    x = model_input(decoded_batch([(10, 90, 200)]).to_pylist()[0], model.config, torch.float32)
    with torch.inference_mode():
        expected = model.encode_vision(x[None, None])[0, 0]
    assert row["visual_dtype"] == "float32" and torch.equal(tokens, expected)


def test_unknown_dtype_is_one_line_everywhere(task_file, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(image_bytes())
    result = CliRunner().invoke(main, ["run", str(task_file), "--input", str(tmp_path / "in"), "--output",
                                       str(tmp_path / "out"), "--dtype", "float8"])
    assert result.exit_code == 2 and "'float8' is not one of 'auto', 'float32'" in result.output
    job_file = tmp_path / "job.yaml"
    job_file.write_text(f"tasks: [{task_file}]\ninput: in\noutput: out\ndtype: fp8\n")
    result = CliRunner().invoke(main, ["run", "--config", str(job_file)])
    assert result.exit_code == 2 and f"{job_file}: dtype: 'fp8' is not one of" in result.output
    with pytest.raises(JobError, match=r"^unknown dtype 'fp8': choose one of"):
        run_job(JobConfig((load_task(task_file),), str(tmp_path / "in"), str(tmp_path / "out"), model=MODEL,
                          dtype="fp8", progress=False))


@pytest.mark.parametrize(("text", "size"), [("3", PoolSize(3, 3)), ("1-8", PoolSize(1, 8)), (2, PoolSize(2, 2)),
                                            (" 2-2 ", PoolSize(2, 2))])
def test_pool_sizes(text, size):
    assert parse_pool_size(text) == size and str(size) == str(text).strip().replace("2-2", "2")


@pytest.mark.parametrize("text", ["0", "4-2", "1-", "-3", "two", "1-2-3", True])
def test_bad_pool_sizes_are_one_line(text):
    with pytest.raises(ValueError, match="actor count"):
        parse_pool_size(text)


def test_pool_sizes_become_ray_strategies():
    fixed = actor_pool(StageResources(pool_size=2))
    scaling = actor_pool(StageResources(pool_size=1, max_pool_size=4))
    assert (fixed.min_size, fixed.max_size) == (2, 2) and (scaling.min_size, scaling.max_size) == (1, 4)


@pytest.mark.usefixtures("ray_session")
def test_a_bfloat16_run_with_an_autoscaling_pool(task_file, tmp_path):
    (tmp_path / "in").mkdir()
    for i in range(4):
        (tmp_path / "in" / f"{i}.png").write_bytes(image_bytes((40 * i, 100, 200 - 30 * i)))
    out = tmp_path / "out"
    # Quarter CPUs: two vision actors and one LM actor leave a whole CPU to the read and decode tasks.
    result = CliRunner().invoke(main, [
        "run", str(task_file), "--input", str(tmp_path / "in"), "--output", str(out), "--model", MODEL,
        "--dtype", "bfloat16", "--vision-actors", "1-2", "--vision-cpus", "0.25", "--vision-batch-size", "2",
        "--no-progress"])
    assert result.exit_code == 0, result.output
    rows = pq.read_table(out).to_pylist()
    assert len(rows) == 4 and all(r["error"] is None and r["annotation"] is not None for r in rows)
    record = json.loads(next((out / "_runs").glob("*.json")).read_text())
    settings = record["settings"]
    assert settings["dtype"] == "bfloat16"
    assert (settings["vision"]["pool_size"], settings["vision"]["max_pool_size"]) == (1, 2)


@pytest.mark.slow   # ~1.5 min on 2 cores: the GPU check's own steps, run on the CPU so it is known to run
def test_gpu_check_runs_on_the_cpu(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}  # python3: this venv's
    done = subprocess.run(["bash", "jobs/gpu_check.sh", str(tmp_path), "--cpu"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    assert results["fp32_tokens_equal"] and results["stages_bf16_tokens_equal_whole_model"]
    assert results["stages_bf16_token_dtype"] == "torch.bfloat16"


def test_job_files_hold_the_dtype_and_pool_ranges(task_file, tmp_path):
    from flamingo_annotate.job_file import read_job_file

    job_file = tmp_path / "job.yaml"
    job_file.write_text(f"tasks: [{task_file}]\ninput: in\noutput: out\ndtype: bfloat16\nvision-actors: 1-8\n"
                        "generate_actors: 2\n")
    defaults, problems = read_job_file(job_file, main.commands["run"])
    assert problems == []
    assert (defaults["dtype"], defaults["vision_actors"], defaults["generate_actors"]) == ("bfloat16", "1-8", 2)
    job_file.write_text(f"tasks: [{task_file}]\ninput: in\noutput: out\nvision-actors: 8-1\n")
    _, problems = read_job_file(job_file, main.commands["run"])
    assert problems == [f"{job_file}: vision-actors: '8-1': actor counts are at least 1, and MIN is at most MAX"]
