"""GPU check: does the model library give on a CUDA device what it gives on the CPU, and how fast is it there?

    python jobs/gpu_check.py [--model miniature] [--json results.json]
    python jobs/gpu_check.py --cpu          # the same steps on the CPU at tiny sizes: proves the script runs

Run on a machine with an NVIDIA GPU, from the repository root (see `jobs/gpu_check.sh` for a bare machine that
has PyTorch but not the project's other dependencies). It prints figures and exits non-zero when a check fails:

1. The bundled model in float32 on the GPU against the CPU: logits of one few-shot prompt with images (max
   absolute difference; TF32 matmuls are turned off for this, so the difference is rounding order only), and the
   generated tokens (greedy, must be equal).
2. The same in bfloat16 on the GPU against float32 on the CPU: the logits' max difference and the share of
   greedy tokens that agree (reported, not asserted: bf16 changes near-ties).
3. The job's two stages in bfloat16 (`--dtype bfloat16`), as its actors run them: the vision part alone makes
   the visual tokens, they cross to the generation side in bfloat16 (through the pipeline's own wire format
   when pyarrow is installed), and the LM generates from them. Asserted: the tokens stay bfloat16, and the
   split stages generate exactly what the whole bfloat16 model generates from the pixels.
4. Generation throughput on the GPU, float32 against bfloat16, in one run (a ratio, as the machine may be
   shared), and the matmul rate measured in the same run, so the figures read as shares of what the chip does.
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


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.inference_mode()
def logits_and_tokens(model, device: str, dtype: torch.dtype, new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    vision_x, lang_x, mask = prompt(model, batch=4, shots=2, device=device, dtype=dtype)
    logits = model(vision_x=vision_x, lang_x=lang_x, attention_mask=mask).logits.float().cpu()
    tokens = model.generate(vision_x=vision_x, lang_x=lang_x, attention_mask=mask, max_new_tokens=new_tokens,
                            num_beams=1, do_sample=False).cpu()
    return logits, tokens


def ship(tokens: torch.Tensor) -> tuple[torch.Tensor, str]:
    """Visual tokens across the stage boundary: the pipeline's wire format when it can be imported here."""
    try:
        from pipeline.encode import tokens_to_bytes, visual_tensor
    except ImportError as error:  # a bare PyTorch image without pyarrow: the tensor crosses as it is
        return tokens.cpu(), f"in memory ({error.name} not installed)"
    shipped = [tokens_to_bytes(t) for t in tokens.cpu()]
    return torch.stack([visual_tensor(data, tokens.shape[1:], name) for data, name in shipped]), "pipeline wire format"


@torch.inference_mode()
def split_stages(model_name: str, device: str, new_tokens: int) -> dict[str, object]:
    """Vision in bfloat16, tokens shipped, generation in bfloat16 (check 3)."""
    model = load_model(model_name, device=device, dtype="bfloat16").eval()
    vision_x, lang_x, mask = prompt(model, batch=4, shots=0, device=device, dtype=torch.bfloat16)
    whole = model.generate(vision_x=vision_x, lang_x=lang_x, attention_mask=mask, max_new_tokens=new_tokens,
                           num_beams=1, do_sample=False).cpu()
    vision = model.vision_part()
    tokens = vision(vision_x)                                                # (B, 1, n, D)
    shipped, how = ship(tokens[:, 0])
    split = model.generate(lang_x=lang_x, attention_mask=mask, visual_tokens=shipped[:, None].to(device),
                           max_new_tokens=new_tokens, num_beams=1, do_sample=False).cpu()
    return {"stages_bf16_token_dtype": str(shipped.dtype), "stages_bf16_transport": how,
            "stages_bf16_tokens_equal_whole_model": bool(torch.equal(split, whole))}


@torch.inference_mode()
def items_per_second(model, device: str, dtype: torch.dtype, batch: int, new_tokens: int, repeats: int) -> float:
    vision_x, lang_x, mask = prompt(model, batch=batch, shots=4, device=device, dtype=dtype)
    model.generate(vision_x=vision_x, lang_x=lang_x, attention_mask=mask, max_new_tokens=new_tokens)  # warm-up
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        model.generate(vision_x=vision_x, lang_x=lang_x, attention_mask=mask, max_new_tokens=new_tokens)
    _sync(device)
    return batch * repeats / (time.perf_counter() - start)


def matmul_tflops(device: str, dtype: torch.dtype, n: int, repeats: int = 10) -> float:
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e12


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--new-tokens", type=int, default=12)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--cpu", action="store_true",
                        help="Run every step on the CPU at tiny sizes (no GPU needed): checks the script, not a GPU.")
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    if args.cpu:
        device, args.batch, args.new_tokens, matmul_n, repeats = "cpu", 4, 4, 256, 1
    elif torch.cuda.is_available():
        device, matmul_n, repeats = "cuda", 8192, 5
    else:
        print("no CUDA device: nothing to check (--cpu runs the steps on the CPU)")
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    results: dict[str, object] = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (--cpu)",
                                  "torch": torch.__version__, "model": args.model}

    cpu = load_model(args.model, device="cpu").eval()
    reference_logits, reference_tokens = logits_and_tokens(cpu, "cpu", torch.float32, args.new_tokens)
    gpu = load_model(args.model, device=device, dtype="float32").eval()
    logits, tokens = logits_and_tokens(gpu, device, torch.float32, args.new_tokens)
    results["fp32_max_abs_logit_diff"] = float((logits - reference_logits).abs().max())
    results["fp32_tokens_equal"] = bool(torch.equal(tokens, reference_tokens))
    gpu_bf16 = load_model(args.model, device=device, dtype="bfloat16").eval()
    logits16, tokens16 = logits_and_tokens(gpu_bf16, device, torch.bfloat16, args.new_tokens)
    results["bf16_max_abs_logit_diff"] = float((logits16 - reference_logits).abs().max())
    same_shape = tokens16.shape == reference_tokens.shape
    results["bf16_token_agreement"] = float((tokens16 == reference_tokens).float().mean()) if same_shape else None
    results.update(split_stages(args.model, device, args.new_tokens))

    fp32 = items_per_second(gpu, device, torch.float32, args.batch, args.new_tokens, repeats)
    bf16 = items_per_second(gpu_bf16, device, torch.bfloat16, args.batch, args.new_tokens, repeats)
    results.update({"generate_items_per_s_fp32": fp32, "generate_items_per_s_bf16": bf16, "bf16_speedup": bf16 / fp32,
                    "matmul_tflops_fp32": matmul_tflops(device, torch.float32, matmul_n),
                    "matmul_tflops_bf16": matmul_tflops(device, torch.bfloat16, matmul_n)})
    for key, value in results.items():
        print(f"{key:<36} {value:.4g}" if isinstance(value, float) else f"{key:<36} {value}")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(results, indent=2))
    failed = []
    if not (results["fp32_tokens_equal"] and results["fp32_max_abs_logit_diff"] < 1e-3):  # type: ignore[operator]
        failed.append(f"float32 on {device} differs from the CPU")
    if results["stages_bf16_token_dtype"] != "torch.bfloat16" or not results["stages_bf16_tokens_equal_whole_model"]:
        failed.append("the bfloat16 stages, split as the job runs them, differ from the whole bfloat16 model")
    print("OK" if not failed else "FAILED: " + "; ".join(failed))
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
