"""Items/s of each stage of `bench`'s reference workload at several batch sizes, timed alternately in one process
so that every size sees the same load (the basis of the default batch sizes: `pipeline.job` and `bench`):

    .venv/bin/python jobs/measure_batch_sizes.py [--dtype bfloat16] [--vision 16,32,64,128] [--generation 64,128,256]

Each round times every size once over the same items (as many as two batches of the largest size), in an order
that turns each round; the median of the rounds is printed beside each round's figure.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flamingo import load_model  # noqa: E402  (after the path: run as a script from anywhere)
from flamingo_annotate.bench import BenchConfig, Workload, encode, few_shot_prefix, generate_greedy  # noqa: E402


def sizes(text: str) -> list[int]:
    return [int(s) for s in text.split(",") if s.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--model", default=BenchConfig.model)
    parser.add_argument("--vision", type=sizes, default=[16, 32, 64, 128], help="vision batch sizes")
    parser.add_argument("--generation", type=sizes, default=[64, 128, 256], help="generation batch sizes")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()

    dtype = getattr(torch, args.dtype)
    items = 2 * max(args.vision + args.generation)
    model = load_model(args.model, device="cpu", dtype=dtype).requires_grad_(False)
    work = Workload(model, BenchConfig(model=args.model, items=items))
    with torch.inference_mode():
        visual = encode(model, work.images, "cpu", dtype)
        prefix = few_shot_prefix(model, work, BenchConfig.shots, "cpu", dtype)
        stages = {
            "vision": (args.vision, lambda b: [encode(model, x, "cpu", dtype) for x in work.images.split(b)]),
            "generation": (args.generation, lambda b: [generate_greedy(model, work, v, prefix, BenchConfig.new_tokens,
                                                                       "cpu") for v in visual.split(b)]),
        }
        for stage, (batch_sizes, run) in stages.items():
            for b in batch_sizes:
                run(b)  # warm-up: one-off costs of a new shape
            rates: dict[int, list[float]] = {b: [] for b in batch_sizes}
            for r in range(args.rounds):
                for b in batch_sizes[r % len(batch_sizes):] + batch_sizes[:r % len(batch_sizes)]:
                    start = time.perf_counter()
                    run(b)
                    rates[b].append(items / (time.perf_counter() - start))
            for b, measured in rates.items():
                print(f"{args.dtype} {stage} batch {b}: median {statistics.median(measured):.1f} items/s "
                      f"(rounds: {', '.join(f'{x:.1f}' for x in measured)})")


if __name__ == "__main__":
    main()
