"""Throughput benchmark: how many items per second each stage and the whole job annotate, what share of
the machine's matmul rate that is, and (optionally) the same workload through OpenFlamingo's own
`generate()` as its evaluation harness runs it, with the ratio and a check that greedy outputs agree.

Speed does not depend on the weights, so the models are random presets of real sizes. Every figure is
measured in this one run on this one machine: compare ratios, not absolute numbers across machines.
"""

from __future__ import annotations

import importlib.util
import json
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import torch
from torch.utils.flop_counter import FlopCounterMode

SWEEP_ROUNDS = 3   # rounds of the shots sweep (shots_sweep)


@dataclass
class BenchConfig:
    model: str = "random-vits32-llama8"
    trust_remote_code: bool = False  # the model's own code may run (MPT-1B presets need it)
    shots: int = 4                  # demonstrations in the task prompt
    caption_tokens: int = 12        # tokens of each demonstration's text
    query_tokens: int = 3           # tokens after the query image
    new_tokens: int = 20            # generated per item (exactly: stop tokens are held off until then)
    batch_size: int = 128           # ours: decoding is bound by reading weights, so large batches pay
    vision_batch_size: int = 64     # the encoder's matmuls are large already; float32 at 128 measured slower
    openflamingo_batch_size: int = 8  # OpenFlamingo's evaluation harness
    items: int = 256                # two generation batches timed, after one untimed warm-up batch
    device: str = "cpu"
    dtype: str | None = "auto"      # flamingo.dtypes (None: auto): bfloat16 on CUDA, float32 on the CPU
    compile: bool = False           # torch.compile the decode step (its compile time is reported apart)
    shots_sweep: tuple[int, ...] = (0, 4, 16, 32)
    compare_openflamingo: bool = False
    pipeline: bool = False          # also run the workload as a real Ray job (read, decode, both actor pools, write)
    pipeline_items: int = 2000      # items of that job (tiny images: the job's own costs show)
    seed: int = 0


@dataclass
class StageResult:
    items_per_second: float
    seconds_per_item: float
    flops_per_item: float
    matmul_share: float             # achieved FLOP/s / measured matmul FLOP/s


@dataclass
class BenchResult:
    config: dict
    device: str
    # The higher of two measurements, before and after the stages: on a shared machine one measurement can
    # catch a busy moment and inflate every share; the higher rate errs towards lower shares.
    matmul_flops_per_second: float
    vision: StageResult
    generation: StageResult
    end_to_end: StageResult         # vision + generation for the same items, in-process
    prefix_seconds: float           # the few-shot prefix, once per task
    warm_up_seconds: float          # the first generation batch: one-off costs, torch.compile's included
    compiled: bool                  # whether the decode step ran compiled
    peak_memory_bytes: int          # of the timed stages (the process's peak RSS on the CPU)
    shots_sweep: dict[int, float] = field(default_factory=dict)  # shots -> seconds per item (generation)
    openflamingo: dict | None = None
    pipeline: dict | None = None    # the same workload as a Ray job: steady items/s, start-up apart (run_pipeline)
    # With compile: generation items/s of the compiled and the eager step, batches alternating between the two
    # so that both see the same load; their ratio is the compile's gain in this run.
    compile_comparison: dict | None = None
    # In a dtype other than float32: how many items' greedy outputs equal those of the same weights in float32.
    float32_agreement: dict | None = None


def measure_matmul_rate(device: str, dtype: torch.dtype, size: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of a large square matmul: the ceiling the model's share is measured against."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn, device: str):
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - start


def _flops(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


class Workload:
    """Synthetic few-shot captioning: random images, random caption tokens, fixed lengths."""

    def __init__(self, model, config: BenchConfig):
        g = torch.Generator().manual_seed(config.seed)
        size = model.config.image_size
        vocab = min(len(model.tokenizer), model.lang_encoder.get_input_embeddings().weight.shape[0])
        special = {model.media_token_id, model.eoc_token_id, model.tokenizer.pad_token_id}
        ordinary = torch.tensor([t for t in range(min(vocab, 256)) if t not in special])
        pick = lambda n: ordinary[torch.randint(len(ordinary), (n,), generator=g)]  # noqa: E731
        self.images = torch.randn(config.items, 3, size, size, generator=g)
        self.demo_images = torch.randn(max(config.shots_sweep + (config.shots,)), 3, size, size, generator=g)
        self.captions = [pick(config.caption_tokens) for _ in range(len(self.demo_images))]
        self.query = torch.cat([torch.tensor([model.media_token_id]), pick(config.query_tokens)])
        self.model = model

    def prefix_ids(self, shots: int) -> torch.Tensor:
        m = self.model
        parts = [torch.cat([torch.tensor([m.media_token_id]), c, torch.tensor([m.eoc_token_id])])
                 for c in self.captions[:shots]]
        return torch.cat(parts)[None] if parts else torch.zeros(1, 0, dtype=torch.long)


def encode(model, images: torch.Tensor, device: str, dtype: torch.dtype) -> torch.Tensor:
    """Visual tokens of `images` (B, 3, H, W), each a one-frame item."""
    return model.encode_vision(images[:, None, None].to(device, dtype))


def few_shot_prefix(model, work: Workload, shots: int, device: str, dtype: torch.dtype):
    """The task's prefix of the first `shots` demonstrations; None for none (the query is the whole prompt)."""
    if shots == 0:
        return None
    return model.prepare_prefix(work.prefix_ids(shots).to(device),
                                visual_tokens=encode(model, work.demo_images[:shots], device, dtype).transpose(0, 1))


def generate_greedy(model, work: Workload, visual: torch.Tensor, prefix, new_tokens: int, device: str) -> torch.Tensor:
    """Exactly `new_tokens` greedy tokens for each item of `visual`, after the prefix and the workload's query."""
    query = work.query[None].expand(len(visual), -1).to(device)
    return model.generate(lang_x=query, visual_tokens=visual, prefix=prefix, max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, return_dict=True).new_tokens


def run_benchmark(config: BenchConfig) -> BenchResult:
    from flamingo import load_model
    from flamingo.dtypes import resolve_dtype

    dtype = resolve_dtype(config.dtype, config.device)
    torch.manual_seed(config.seed)
    model = load_model(config.model, device=config.device, dtype=dtype,
                       trust_remote_code=config.trust_remote_code).requires_grad_(False)   # inference only
    compiled = config.compile and model.compile_decoding()
    work = Workload(model, config)
    dev = config.device
    rate_before = measure_matmul_rate(dev, dtype)

    def vision(batch: torch.Tensor) -> torch.Tensor:
        return encode(model, batch, dev, dtype)

    def prefix_for(shots: int):
        return few_shot_prefix(model, work, shots, dev, dtype)

    def generate(visual: torch.Tensor, prefix) -> torch.Tensor:
        return generate_greedy(model, work, visual, prefix, config.new_tokens, dev)

    batches = list(torch.split(work.images, config.vision_batch_size))
    with torch.inference_mode():
        vision(batches[0])  # warm-up
        encoded, vision_seconds = _timed(lambda: [vision(b) for b in batches], dev)
        visual = torch.cat(encoded).split(config.batch_size)
        prefix, prefix_seconds = _timed(lambda: prefix_for(config.shots), dev)
        _, warm_up_seconds = _timed(lambda: generate(visual[0], prefix), dev)  # compiles, if compiling
        if len(visual[-1]) != len(visual[0]):
            generate(visual[-1], prefix)  # a last, smaller batch is a new shape too
        tokens, generation_seconds = _timed(lambda: [generate(v, prefix) for v in visual], dev)
        # Before FLOPs are counted: the counter runs the ops under a dispatch mode that holds far more (a
        # bfloat16 run peaked at 5.8 GB counting, 1.8 GB annotating).
        peak_memory = _peak_memory(dev)
        vision_flops = _flops(lambda: vision(batches[0])) / len(batches[0])
        compiled_step, model.lm.compiled_step = model.lm.compiled_step, None   # count FLOPs of the same ops eagerly
        generation_flops = _flops(lambda: generate(visual[0], prefix)) / len(visual[0])
        model.lm.compiled_step = compiled_step
        comparison = compare_compiled(model, lambda: [generate(v, prefix) for v in visual[:1]],
                                      len(visual), dev) if compiled_step is not None else None
        sweep = shots_sweep(config.shots_sweep, prefix_for, lambda p: generate(visual[0], p), len(visual[0]), dev)
    rate = max(rate_before, measure_matmul_rate(dev, dtype))

    n = config.items

    def stage(seconds: float, flops: float) -> StageResult:
        return StageResult(n / seconds, seconds / n, flops, flops * n / seconds / rate)

    result = BenchResult(
        config=asdict(config), device=_device_name(dev), matmul_flops_per_second=rate,
        vision=stage(vision_seconds, vision_flops), generation=stage(generation_seconds, generation_flops),
        end_to_end=stage(vision_seconds + generation_seconds, vision_flops + generation_flops),
        prefix_seconds=prefix_seconds, warm_up_seconds=warm_up_seconds,
        compiled=bool(compiled and model.lm.compiled_step is not None),   # a failed compile fell back to eager
        compile_comparison=comparison,
        peak_memory_bytes=peak_memory, shots_sweep=sweep,
    )
    if dtype != torch.float32:
        result.float32_agreement = compare_float32(config, work, torch.cat(tokens))
    if config.compare_openflamingo:   # before the Ray job, whose processes may outlive it for a while

        def end_to_end() -> float:
            def run() -> list[torch.Tensor]:
                return [generate(v, prefix) for v in torch.cat([vision(b) for b in batches]).split(config.batch_size)]

            with torch.inference_mode():
                return _timed(run, dev)[1]

        result.openflamingo = compare_openflamingo(model, work, config, torch.cat(tokens), end_to_end)
    if config.pipeline:
        result.pipeline = run_pipeline(config, result.end_to_end.items_per_second)
    return result


def shots_sweep(counts: tuple[int, ...], prefix_for, generate_batch, batch_items: int, device: str
                ) -> dict[int, float]:
    """Generation seconds per item by number of shots: one batch per count in each of SWEEP_ROUNDS rounds,
    the order reversed every other round, and each count's median. Timed one after the other, a change of
    the machine's load between two counts would read as a cost of the shots."""
    prefixes = {shots: prefix_for(shots) for shots in counts}
    for prefix in prefixes.values():
        generate_batch(prefix)  # warm-up: the first call with new shapes pays one-off costs
    seconds: dict[int, list[float]] = {shots: [] for shots in counts}
    for round_ in range(SWEEP_ROUNDS):
        for shots in (counts if round_ % 2 == 0 else counts[::-1]):
            seconds[shots].append(_timed(lambda p=prefixes[shots]: generate_batch(p), device)[1] / batch_items)
    return {shots: statistics.median(s) for shots, s in seconds.items()}


def compare_float32(config: BenchConfig, work: Workload, tokens: torch.Tensor) -> dict:
    """The same items generated by the same weights in float32 (the preset rebuilt from the same seed, before its
    cast): the share of items whose greedy output is identical, and of tokens that agree position by position.
    Lower precision changes a near-tie between two tokens now and then, and an item's output from there on."""
    from flamingo import load_model

    torch.manual_seed(config.seed)
    model = load_model(config.model, device=config.device, dtype=torch.float32,
                       trust_remote_code=config.trust_remote_code).requires_grad_(False)
    dev = config.device
    with torch.inference_mode():
        prefix = few_shot_prefix(model, work, config.shots, dev, torch.float32)
        visual = torch.cat([encode(model, batch, dev, torch.float32)
                            for batch in torch.split(work.images, config.vision_batch_size)])
        reference = torch.cat([generate_greedy(model, work, v, prefix, config.new_tokens, dev).cpu()
                               for v in visual.split(config.batch_size)])
    same = reference == tokens.cpu()
    return {"items": len(same), "items_identical": int(same.all(1).sum()),
            "share_items_identical": float(same.all(1).float().mean()),
            "share_tokens_identical": float(same.float().mean())}


def compare_compiled(model, generate_batch, repeats: int, device: str) -> dict:
    """Items/s of the compiled and the eager decode step, alternating batch by batch (and which goes first)."""
    compiled_step = model.lm.compiled_step
    seconds = {"compiled": 0.0, "eager": 0.0}
    items = 0
    for i in range(repeats):
        for name in (("compiled", "eager") if i % 2 == 0 else ("eager", "compiled")):
            model.lm.compiled_step = compiled_step if name == "compiled" else None
            out, took = _timed(generate_batch, device)
            seconds[name] += took
        items += sum(len(t) for t in out)
    model.lm.compiled_step = compiled_step
    rates = {f"{name}_items_per_second": items / s for name, s in seconds.items()}
    return {**rates, "speedup": seconds["eager"] / seconds["compiled"]}


def run_pipeline(config: BenchConfig, in_process_items_per_second: float) -> dict:
    """The workload as image files and a task file, annotated by `run_job` on a local Ray instance started
    beforehand (its start-up is timed apart).

    Two jobs run on the same instance: a short one of `batch_size` items, then `pipeline_items` items. Both pay
    the same start-up (actors created, models loaded, the prefix computed, the output scanned), so the steady
    rate is the difference of items over the difference of seconds, and the start-up is what the short job
    took beyond its items at that rate. Images are tiny (32 x 32 PNG; the decoder resizes them to the model's
    size) so that thousands fit in a temp folder. Caption and query lengths are in characters, which are
    tokens for the byte-level tokenizer of the random presets."""
    import shutil
    import tempfile
    from pathlib import Path

    import numpy as np
    import ray
    from PIL import Image

    from pipeline.job import JobConfig, StageResources, run_job
    from pipeline.task import load_task

    rng = np.random.default_rng(config.seed)

    def write_image(path: Path, size: int = 32) -> None:
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)

    short = min(config.batch_size, config.pipeline_items - 1)
    with tempfile.TemporaryDirectory(prefix="flamingo-bench-") as tmp:
        root = Path(tmp)
        for folder in ("in", "short"):
            (root / folder).mkdir()
        for i in range(config.pipeline_items):
            write_image(root / "in" / f"{i:05d}.png")
            if i < short:
                shutil.copy(root / "in" / f"{i:05d}.png", root / "short")
        demos = []
        for i in range(config.shots):
            write_image(root / f"demo{i}.png")
            demos.append(f"  - {{media: demo{i}.png, text: '{'abcdefghijklmnopqrstuvwxyz'[:config.caption_tokens]}'}}")
        (root / "task.yaml").write_text(
            "name: bench\nkind: generate\n" + ("demonstrations:\n" + "\n".join(demos) + "\n" if demos else "")
            + f"query: '{'Out:'[:max(config.query_tokens - 1, 0)]}'\n"
            + f"generation: {{max_new_tokens: {config.new_tokens}}}\n")
        task = load_task(root / "task.yaml")
        # On a GPU both pools share it (half each); Ray makes it the actors' "cuda".
        gpu = str(config.device).startswith("cuda")
        resources = StageResources(batch_size=config.batch_size, num_gpus=0.5 if gpu else 0.0)
        vision_resources = replace(resources, batch_size=config.vision_batch_size)
        device = None if gpu else config.device

        def job(folder: str):
            return run_job(JobConfig((task,), str(root / folder), str(root / f"out-{folder}"), model=config.model,
                                     trust_remote_code=config.trust_remote_code, dtype=config.dtype or "auto",
                                     device=device, vision=vision_resources, generation=resources,
                                     progress=False))

        start = time.perf_counter()
        started = not ray.is_initialized()  # a caller's instance (a cluster, a test's) is used as it is
        if started:
            ray.init(include_dashboard=False, log_to_driver=False)
        ray_start = time.perf_counter() - start
        try:
            small, full = job("short"), job("in")
        finally:
            if started:
                ray.shutdown()
        record = json.loads((root / "out-in" / "_runs" / f"{full.run_id}.json").read_text())
    seconds = full.seconds - small.seconds
    rate = (full.items - small.items) / seconds if seconds > 0 else float("nan")
    return {"items": full.items, "rows_ok": full.rows_ok, "ray_start_seconds": ray_start,
            "job_start_seconds": small.seconds - small.items / rate, "job_seconds": full.seconds,
            "items_per_second": rate, "ratio_to_in_process": rate / in_process_items_per_second,
            "stages": record.get("stages", [])}   # where the job's time went (pipeline/stage_stats.py)


def compare_openflamingo(model, work: Workload, config: BenchConfig, our_tokens: torch.Tensor,
                         our_end_to_end: Callable[[], float]) -> dict:
    """The same items through OpenFlamingo 2.0.1's `generate()`, the way its evaluation harness calls it:
    demonstration images and text repeated for every query, one batch at a time. `our_end_to_end` times our
    own vision + generation of the same items; it runs just before and just after OpenFlamingo's loop, and the
    speed-up is against the mean of the two, so a load that drifts during the comparison weighs on both sides."""
    if importlib.util.find_spec("open_flamingo") is None:
        raise RuntimeError("--compare-openflamingo needs OpenFlamingo: pip install --no-deps "
                           "open-flamingo==2.0.1 einops einops-exts")
    from flamingo_annotate.reference import reference_copy

    reference = reference_copy(model)
    from flamingo.dtypes import resolve_dtype

    dev, dtype = config.device, resolve_dtype(config.dtype, config.device)
    prompt = torch.cat([work.prefix_ids(config.shots)[0], work.query])
    demos = work.demo_images[:config.shots]
    batch_size = config.openflamingo_batch_size

    def run(images: torch.Tensor) -> torch.Tensor:
        outputs = []
        for batch in torch.split(images, batch_size):
            vision_x = torch.cat([demos[None].expand(len(batch), -1, -1, -1, -1), batch[:, None]], 1)
            lang_x = prompt[None].expand(len(batch), -1).to(dev)
            out = reference.generate(vision_x[:, :, None].to(dev, dtype), lang_x, torch.ones_like(lang_x),
                                     max_new_tokens=config.new_tokens, min_new_tokens=config.new_tokens,
                                     num_beams=1, do_sample=False, eos_token_id=model.eoc_token_id,
                                     pad_token_id=model.tokenizer.pad_token_id)
            outputs.append(out[:, lang_x.shape[1]:].cpu())
        return torch.cat(outputs)

    ours_before = our_end_to_end()
    with torch.inference_mode():
        theirs, seconds = _timed(lambda: run(work.images), dev)
    ours_after = our_end_to_end()
    with torch.inference_mode():
        flops = _flops(lambda: run(work.images[:batch_size])) / batch_size
    ours = (ours_before + ours_after) / 2
    return {"items_per_second": config.items / seconds, "our_items_per_second": config.items / ours,
            "our_seconds_before_after": [ours_before, ours_after], "speedup": seconds / ours,
            "flops_per_item": flops, "batch_size": batch_size,
            "greedy_outputs_identical": bool(torch.equal(theirs, our_tokens.cpu()))}


def _device_name(device: str) -> str:
    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name()
    import os
    import platform
    return (f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads, "
            f"{os.cpu_count()} cores")


def _peak_memory(device: str) -> int:
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def format_result(result: BenchResult) -> str:
    rows = [("stage", "items/s", "ms/item", "GFLOP/item", "matmul share")]
    for name in ("vision", "generation", "end_to_end"):
        s: StageResult = getattr(result, name)
        rows.append((name, f"{s.items_per_second:.2f}", f"{s.seconds_per_item * 1e3:.1f}",
                     f"{s.flops_per_item / 1e9:.2f}", f"{s.matmul_share:.1%}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [f"device: {result.device}; matmul {result.matmul_flops_per_second / 1e9:.1f} GFLOP/s; "
             f"model {result.config['model']}; {result.config['shots']} shots, "
             f"{result.config['new_tokens']} new tokens, batches: vision {result.config['vision_batch_size']}, "
             f"generation {result.config['batch_size']}, "
             f"{result.config['items']} items, decode step {'compiled' if result.compiled else 'eager'}"]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    lines.append(f"few-shot prefix (once per task): {result.prefix_seconds * 1e3:.1f} ms; first generation batch "
                 f"(one-off costs, compile included, not in the figures above): {result.warm_up_seconds:.1f} s; "
                 f"peak memory {result.peak_memory_bytes / 2**20:.0f} MiB")
    if result.compile_comparison:
        c = result.compile_comparison
        lines.append(f"generation, batches alternating: compiled step {c['compiled_items_per_second']:.2f} items/s, "
                     f"eager step {c['eager_items_per_second']:.2f} items/s: {c['speedup']:.2f}x")
    sweep = result.shots_sweep
    if sweep:
        lines.append("generation ms/item by shots: " + ", ".join(f"{k}: {v * 1e3:.1f}" for k, v in sweep.items())
                     + f" (max/min {max(sweep.values()) / min(sweep.values()):.2f}x)")
    if result.float32_agreement:
        a = result.float32_agreement
        lines.append(f"greedy outputs equal to float32's (same weights): {a['items_identical']}/{a['items']} items "
                     f"({a['share_items_identical']:.1%}), {a['share_tokens_identical']:.1%} of tokens")
    if result.pipeline:
        p = result.pipeline
        lines.append(f"Ray job over {p['items']} images (read, decode, both actor pools, write): "
                     f"{p['items_per_second']:.2f} items/s = {p['ratio_to_in_process']:.2f}x in-process end to end; "
                     f"start-up apart: Ray {p['ray_start_seconds']:.1f} s, each job {p['job_start_seconds']:.1f} s")
        for st in p["stages"]:
            lines.append(f"  {st.get('stage')}: {st.get('items_per_second') or 0:.2f} items/s, "
                         f"{st.get('items_per_busy_second') or 0:.2f} per busy worker-second")
    if result.openflamingo:
        o = result.openflamingo
        lines.append(f"OpenFlamingo generate() (batch {o['batch_size']}, demonstrations re-encoded per query): "
                     f"{o['items_per_second']:.2f} items/s, {o['flops_per_item'] / 1e9:.2f} GFLOP/item; ours "
                     f"{o['our_items_per_second']:.2f} items/s timed just before and after it -> "
                     f"speed-up {o['speedup']:.1f}x; greedy outputs identical: {o['greedy_outputs_identical']}")
    return "\n".join(lines)


def save_result(result: BenchResult, path: str) -> None:
    with open(path, "w") as f:
        json.dump(asdict(result), f, indent=2)
