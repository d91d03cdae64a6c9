"""The tracing engines on CUDA at large model shapes: fp32 vs TF32 matmuls, fast vs naive.

Random-weight models of real shapes (GPT-2 XL, Llama-3-8B) are built from configs on the GPU, so no weights
are downloaded. For each shape and prompt: the fast engine's seconds for all three kinds in fp32 and with TF32
matmuls (core/precision.py), the largest cell difference between the two tables (absolute, and relative to
the fp32 table's range), peak GPU memory, and on the smaller shape the naive engine beside it (fast == naive
in fp32). A float64 run on a shortened GPT-2 XL checks fast == naive to 1e-10 on CUDA.

    python bench/gpu.py --tokenizer DIR --json out/gpu.json [--shapes gpt2-xl,llama-3-8b] [--budget 420]

DIR: a tokenizer folder (the embedded model's cache folder by default); its ids must fit the vocabulary.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, LlamaConfig

from core.models import wrap_model
from core.precision import tf32_matmuls
from core.trace_setup import score_json
from core.tracing import KINDS, trace

SHAPES = {
    "gpt2-xl": lambda: GPT2Config(
        vocab_size=50257, n_positions=1024, n_embd=1600, n_layer=48, n_head=25, bos_token_id=0, eos_token_id=0
    ),
    "llama-3-8b": lambda: LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
    ),
}
FACT = ("The Space Needle is located in the city of", "The Space Needle")
LONG = (
    "Mondays are the worst: the alarm rings at six, the train is late again, the coffee machine at work is "
    "broken, my inbox is full of meetings I never asked for, and the rain has not stopped since Sunday night. "
    "I am feeling",
    "Mondays",
)


DEVICE = "cuda"


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def synced_seconds(fn):
    sync()
    start = time.perf_counter()
    value = fn()
    sync()
    return value, time.perf_counter() - start


def build(shape: str, tokenizer, dtype=torch.float32, layers: int | None = None):
    config = SHAPES[shape]()
    if layers is not None:
        for name in ("n_layer", "num_hidden_layers"):
            if hasattr(config, name):
                setattr(config, name, layers)
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    lm = wrap_model(model, tokenizer, f"random {shape}" + (f" ({layers} layers)" if layers else ""), device=DEVICE)
    if dtype != torch.float32:
        lm.model.to(dtype)
    return lm


def table(result) -> np.ndarray:
    return np.stack([result.scores[kind] for kind in KINDS])


def compare(a: np.ndarray, b: np.ndarray) -> dict:
    span = float(a.max() - a.min())
    diff = float(np.abs(a - b).max())
    return {"max_abs_diff": diff, "table_range": span, "max_diff_over_range": diff / span if span else None}


def peak_gib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else None


def run_shape(
    shape: str, tokenizer, with_naive: bool, deadline: float, layers: int | None, prompts: list[str]
) -> list[dict]:
    rows = []
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    lm, build_s = synced_seconds(lambda: build(shape, tokenizer, layers=layers))
    print(f"{shape}: {lm.num_parameters / 1e9:.2f} B parameters built in {build_s:.1f} s", flush=True)
    for label, (prompt, subject) in (("fact", FACT), ("long", LONG)):
        if label not in prompts:
            continue
        if time.perf_counter() > deadline:
            print(f"  {label}: skipped (time budget)", flush=True)
            continue
        trace(lm, prompt, subject, kinds=("hidden",), engine="fast")  # warm-up (kernels, allocator)
        fp32, fp32_s = synced_seconds(lambda: trace(lm, prompt, subject, engine="fast"))
        with tf32_matmuls(lm, enabled=DEVICE == "cuda"):
            tf32, tf32_s = synced_seconds(lambda: trace(lm, prompt, subject, engine="fast"))
        row = {
            "shape": shape,
            "prompt": label,
            "tokens": len(fp32.tokens),
            "layers": lm.num_layers,
            "fast_fp32_seconds": fp32_s,
            "fast_tf32_seconds": tf32_s,
            "tf32_vs_fp32": compare(table(fp32), table(tf32)),
            **score_json(fp32.clean_score, fp32.corrupted_score),
        }
        if with_naive and label == "fact" and time.perf_counter() < deadline - 120:
            naive, naive_s = synced_seconds(lambda: trace(lm, prompt, subject, engine="naive"))
            row["naive_fp32_seconds"] = naive_s
            row["fast_vs_naive_fp32"] = compare(table(naive), table(fp32))
        row["peak_gpu_gib"] = peak_gib()
        print("  " + json.dumps(row), flush=True)
        rows.append(row)
    lm = None  # free the weights before the next shape
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return rows


def float64_check(tokenizer) -> dict:
    lm = build("gpt2-xl", tokenizer, dtype=torch.float64, layers=4)
    prompt, subject = FACT
    fast = trace(lm, prompt, subject, engine="fast", samples=4)
    naive = trace(lm, prompt, subject, engine="naive", samples=4)
    row = {"shape": "gpt2-xl (4 layers), float64", **compare(table(naive), table(fast))}
    print("  " + json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", required=True, help="a tokenizer folder (e.g. the embedded model's)")
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of the script (with --layers)")
    parser.add_argument("--layers", type=int, default=None, help="shorten every shape to this many layers")
    parser.add_argument("--shapes", default="gpt2-xl,llama-3-8b")
    parser.add_argument("--prompts", default="fact,long", help="which of fact,long to trace")
    parser.add_argument("--no-float64", action="store_true", help="skip the float64 fast == naive check")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds: later steps are skipped after this")
    parser.add_argument("--json", dest="json_out", default=None)
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py needs a CUDA device")
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    deadline = time.perf_counter() + args.budget
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    report = {"device": name, "torch": torch.__version__, "rows": []}
    if not args.no_float64:
        report["float64"] = float64_check(tokenizer)
    for i, shape in enumerate(args.shapes.split(",")):
        if time.perf_counter() > deadline:
            break
        report["rows"] += run_shape(
            shape,
            tokenizer,
            with_naive=(i == 0),
            deadline=deadline,
            layers=args.layers,
            prompts=args.prompts.split(","),
        )
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(report, indent=1))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
