"""The benchmark runs and its fast path gives exactly what OpenFlamingo's own generate() gives (it times
things, but the test asserts no timings)."""

import json

import pytest
from click.testing import CliRunner

from flamingo_annotate.cli import main

pytest.importorskip("open_flamingo")


@pytest.mark.slow   # a benchmark: the parity tests hold generation to OpenFlamingo in the default run
def test_bench_runs_and_matches_openflamingo(tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(main, [
        "bench", "--model", "tiny-random-openflamingo", "--items", "8", "--batch-size", "4",
        "--openflamingo-batch-size", "4",
        "--shots", "2", "--caption-tokens", "4", "--new-tokens", "5", "--shots-sweep", "0,2",
        "--compare-openflamingo", "--compile", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "greedy outputs identical: True" in result.output
    figures = json.loads(out.read_text())
    assert figures["openflamingo"]["greedy_outputs_identical"] is True
    # The speed-up is against our own path timed just before and just after OpenFlamingo's loop.
    before, after = figures["openflamingo"]["our_seconds_before_after"]
    assert before > 0 and after > 0
    assert figures["openflamingo"]["our_items_per_second"] == pytest.approx(8 / ((before + after) / 2))
    for stage in ("vision", "generation", "end_to_end"):
        assert figures[stage]["items_per_second"] > 0 and figures[stage]["flops_per_item"] > 0
    # The reference re-encodes the demonstrations and re-reads the whole prompt for every item.
    assert figures["openflamingo"]["flops_per_item"] > figures["end_to_end"]["flops_per_item"]
    assert set(figures["shots_sweep"]) == {"0", "2"}
    # The compiled decode step gave those outputs, and was timed against the eager one in the same run.
    assert figures["compiled"] is True and figures["compile_comparison"]["speedup"] > 0


def test_bfloat16_outputs_are_compared_with_float32_of_the_same_weights(tmp_path):
    """In bfloat16 the bench reports how many items decode exactly as in float32; the float32 side rebuilds the
    same weights, so a float32 run's own tokens agree with it on every item."""
    from flamingo_annotate.bench import (
        BenchConfig,
        Workload,
        compare_float32,
        encode,
        few_shot_prefix,
        generate_greedy,
        run_benchmark,
    )

    small = dict(model="tiny-random-openflamingo", items=6, batch_size=3, vision_batch_size=4, shots=1,
                 caption_tokens=3, new_tokens=4, shots_sweep=())   # vision batches 4 + 2, generation 3 + 3
    float32 = run_benchmark(BenchConfig(dtype="float32", **small))
    assert float32.float32_agreement is None
    bf16 = run_benchmark(BenchConfig(dtype="bfloat16", **small))
    agreement = bf16.float32_agreement
    assert agreement is not None and agreement["items"] == 6
    assert 0 <= agreement["items_identical"] <= 6 and 0.0 <= agreement["share_tokens_identical"] <= 1.0

    # The float32 reference is the same model: fed its own greedy tokens, it agrees everywhere.
    import torch

    from flamingo import load_model

    config = BenchConfig(dtype="float32", **small)
    torch.manual_seed(config.seed)
    model = load_model(config.model, dtype=torch.float32).requires_grad_(False)
    work = Workload(model, config)
    with torch.inference_mode():
        prefix = few_shot_prefix(model, work, 1, "cpu", torch.float32)
        tokens = generate_greedy(model, work, encode(model, work.images, "cpu", torch.float32), prefix, 4, "cpu")
    assert compare_float32(config, work, tokens)["items_identical"] == 6
    tokens = tokens.clone()
    tokens[0, -1] += 1  # one token off: that item no longer counts as identical
    assert compare_float32(config, work, tokens)["items_identical"] == 5


def test_models_openflamingo_cannot_represent_are_refused():
    result = CliRunner().invoke(main, ["bench", "--model", "tiny-random", "--items", "2", "--batch-size", "2",
                                       "--new-tokens", "2", "--shots-sweep", "", "--compare-openflamingo"])
    assert result.exit_code != 0 and "OpenFlamingo's fixed sizes" in str(result.exception)


@pytest.mark.slow  # two Ray jobs back to back (~1-2 min); `make test-slow` runs it
@pytest.mark.usefixtures("ray_session")
def test_bench_pipeline_reports_a_steady_rate_as_a_ratio(tmp_path):
    """A smoke test at tiny sizes: the figures' meaning is in bench.run_pipeline, not asserted here."""
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(main, [
        "bench", "--model", "tiny-random", "--items", "4", "--batch-size", "2", "--shots", "1",
        "--caption-tokens", "2", "--new-tokens", "2", "--shots-sweep", "", "--pipeline", "--pipeline-items", "6",
        "--json", str(out)])
    assert result.exit_code == 0, result.output
    pipeline = json.loads(out.read_text())["pipeline"]
    assert (pipeline["items"], pipeline["rows_ok"]) == (6, 6)
    # 6 items against 2 time nothing steady: only that the figures are there
    assert {"ratio_to_in_process", "job_start_seconds"} <= set(pipeline) and "in-process end to end" in result.output
    assert {"MapBatches(VisionEncoder)", "MapBatches(Annotator)"} <= {s["stage"] for s in pipeline["stages"]}


def test_the_shots_sweep_times_every_count_in_rounds_and_keeps_the_median(monkeypatch):
    """Each count is timed once per round, the order reversed every other round, so a load that drifts during
    the sweep does not read as a cost of the shots; each count's figure is the median of its rounds."""
    from flamingo_annotate import bench

    calls: list[int] = []
    seconds = {0: [3.0, 1.0, 2.0], 4: [9.0, 5.0, 7.0]}   # what each timed round of a count takes

    def generate_batch(prefix: int) -> int:
        calls.append(prefix)
        return prefix

    def fake_timed(fn, device):
        shots = fn()
        return None, seconds[shots][calls.count(shots) - 2]   # the first call of each count is its warm-up

    monkeypatch.setattr(bench, "_timed", fake_timed)
    sweep = bench.shots_sweep((0, 4), lambda shots: shots, generate_batch, batch_items=2, device="cpu")
    assert calls == [0, 4] + [0, 4, 4, 0, 0, 4]          # warm-ups, then rounds in alternating order
    assert sweep == {0: 1.0, 4: 3.5}                      # medians (2.0 and 7.0 s) per item of 2
