"""GPU check: does the model library give on a CUDA device what it gives on the CPU, and how fast is it there?

    python jobs/gpu_check.py [--model miniature] [--json results.json]

Run on a machine with an NVIDIA GPU, from the repository root (see `jobs/gpu_check.sh` for a bare machine that
has PyTorch but not the project's other dependencies). It prints figures and exits non-zero when a check fails:

1. The bundled model in float32 on the GPU against the CPU: logits of one few-shot prompt with images (max
   absolute difference; TF32 matmuls are turned off for this, so the difference is rounding order only), and the
   generated tokens (greedy, must be equal).
2. The same in bfloat16 on the GPU against float32 on the CPU: the logits' max difference and the share of
   greedy tokens that agree (reported, not asserted: bf16 changes near-ties).
3. Generation throughput on the GPU, float32 against bfloat16, in one run (a ratio, as the machine may be
   shared), and the matmul rate measured in the same run, so the figures read as shares of what the chip does.

Only the model library (`flamingo/`) is used: no Ray, no pipeline.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flamingo import DEFAULT_MODEL, load_model  # noqa: E402  (the repository root is on the path only now)
from flamingo.tokens import END_OF_CHUNK_TOKEN, MEDIA_TOKEN  # noqa: E402


def prompt(model, batch: int, shots: int, device: str, dtype: torch.dtype):
    """A few-shot batch: `shots` demonstrations + one query, each an image, random pixels with a fixed seed."""
    size = model.config.image_size
    generator = torch.Generator().manual_seed(0)
    vision_x = torch.rand(batch, shots + 1, 1, 3, size, size, generator=generator)
    text = "".join(f"{MEDIA_TOKEN} a red circle{END_OF_CHUNK_TOKEN}" for _ in range(shots)) + f"{MEDIA_TOKEN} a"
    lang_x, mask = model.tokenize([text] * batch)
    return vision_x.to(device, dtype), lang_x.to(device), mask.to(device)


@torch.inference_mode()
def logits_and_tokens(model, device: str, dtype: torch.dtype, new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    vision_x, lang_x, mask = prompt(model, batch=4, shots=2, device=device, dtype=dtype)
    logits = model(vision_x=vision_x, lang_x=lang_x, attention_mask=mask).logits.float().cpu()
    tokens = model.generate(vision_x=vision_x, lang_x=lang_x, attention_mask=mask, max_new_tokens=new_tokens,
                            num_beams=1, do_sample=False).cpu()
    return logits, tokens


@torch.inference_mode()
def items_per_second(model, device: str, dtype: torch.dtype, batch: int, new_tokens: int, repeats: int = 5) -> float:
    vision_x, lang_x, mask = prompt(model, batch=batch, shots=4, device=device, dtype=dtype)
    model.generate(vision_x=vision_x, lang_x=lang_x, attention_mask=mask, max_new_tokens=new_tokens)  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        model.generate(vision_x=vision_x, lang_x=lang_x, attention_mask=mask, max_new_tokens=new_tokens)
    torch.cuda.synchronize()
    return batch * repeats / (time.perf_counter() - start)


def matmul_tflops(dtype: torch.dtype, n: int = 8192, repeats: int = 10) -> float:
    a, b = (torch.randn(n, n, device="cuda", dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e12


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--new-tokens", type=int, default=12)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    results: dict[str, object] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                  "model": args.model}

    cpu = load_model(args.model, device="cpu").eval()
    reference_logits, reference_tokens = logits_and_tokens(cpu, "cpu", torch.float32, args.new_tokens)
    gpu = load_model(args.model, device="cuda").eval()
    logits, tokens = logits_and_tokens(gpu, "cuda", torch.float32, args.new_tokens)
    results["fp32_max_abs_logit_diff"] = float((logits - reference_logits).abs().max())
    results["fp32_tokens_equal"] = bool(torch.equal(tokens, reference_tokens))
    gpu_bf16 = load_model(args.model, device="cuda", dtype=torch.bfloat16).eval()
    logits16, tokens16 = logits_and_tokens(gpu_bf16, "cuda", torch.bfloat16, args.new_tokens)
    results["bf16_max_abs_logit_diff"] = float((logits16 - reference_logits).abs().max())
    same_shape = tokens16.shape == reference_tokens.shape
    results["bf16_token_agreement"] = float((tokens16 == reference_tokens).float().mean()) if same_shape else None

    fp32 = items_per_second(gpu, "cuda", torch.float32, args.batch, args.new_tokens)
    bf16 = items_per_second(gpu_bf16, "cuda", torch.bfloat16, args.batch, args.new_tokens)
    results.update({"generate_items_per_s_fp32": fp32, "generate_items_per_s_bf16": bf16, "bf16_speedup": bf16 / fp32,
                    "matmul_tflops_fp32": matmul_tflops(torch.float32),
                    "matmul_tflops_bf16": matmul_tflops(torch.bfloat16)})
    for key, value in results.items():
        print(f"{key:<28} {value:.4g}" if isinstance(value, float) else f"{key:<28} {value}")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(results, indent=2))
    ok = results["fp32_tokens_equal"] and results["fp32_max_abs_logit_diff"] < 1e-3  # type: ignore[operator]
    print("OK" if ok else "FAILED: float32 on the GPU differs from the CPU")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
