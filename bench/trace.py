"""Fast vs naive causal tracing on the embedded model, side by side in one run.

For each fact and kind: seconds of each engine, the speed ratio, the largest cell difference, the
multiply-adds each engine performed (counted by hooks on the blocks and the unembedding: weight matmuls
only, as DESIGN.md's performance envelope counts them) and the GFLOP/s achieved. Each engine runs in its own
child process so its peak memory (max RSS) is its own.

    .venv/bin/python bench/trace.py [--facts N] [--kinds hidden,mlp,attn] [--json out/bench_trace.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

FACTS = [
    ("The Acropolis is located in the city of", "The Acropolis"),
    ("The Eiffel Tower is located in the city of", "The Eiffel Tower"),
    ("The Space Needle is located in the city of", "The Space Needle"),
    ("Tourists know that the Colosseum is located in the city of", "the Colosseum"),
]


def weight_matmuls(lm) -> list:
    """The modules doing weight matmuls: every 2-D-weight module in the blocks (Linear, GPT-2 Conv1D), and
    the unembedding."""
    blocks = lm.model.get_submodule(lm.arch.blocks)
    modules = [m for m in blocks.modules() if getattr(m, "weight", None) is not None and m.weight.dim() == 2]
    return [*modules, lm.model.get_submodule(lm.arch.lm_head)]


def worker(engine: str, fact: int, kind: str) -> dict:
    import torch

    from core.models import load_model
    from core.tracing import prepare, trace_kind

    lm = load_model(device="cpu")
    prompt, subject = FACTS[fact]
    setup = prepare(lm, prompt, subject)
    counts = {"macs": 0}

    def count(module, args, output):
        rows = args[0].numel() // args[0].shape[-1]
        counts["macs"] += rows * module.weight.numel()

    handles = [module.register_forward_hook(count) for module in weight_matmuls(lm)]
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    table = trace_kind(setup, kind, engine)
    seconds = time.perf_counter() - start
    for h in handles:
        h.remove()
    macs = counts["macs"]
    return {
        "engine": engine,
        "fact": prompt,
        "kind": kind,
        "tokens": setup.num_tokens,
        "subject_range": list(setup.corrupt_range),
        "seconds": seconds,
        "macs": macs,
        "gflops": 2 * macs / seconds / 1e9,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "model_rss_mb": rss_before / 1024,
        "threads": torch.get_num_threads(),
        "table": table.tolist(),
    }


def run_child(engine: str, fact: int, kind: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--worker", engine, str(fact), kind],
        check=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--facts", type=int, default=2, help="how many of the built-in facts")
    parser.add_argument("--kinds", default="hidden,mlp,attn")
    parser.add_argument("--json", dest="json_out")
    parser.add_argument("--worker", nargs=3, metavar=("ENGINE", "FACT", "KIND"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        engine, fact, kind = args.worker
        print(json.dumps(worker(engine, int(fact), kind)))
        return

    import numpy as np

    rows = []
    print(
        f"{'fact':46s} {'kind':6s} {'naive s':>8s} {'fast s':>7s} {'ratio':>6s} {'max diff':>9s} "
        f"{'naive GMAC':>10s} {'fast GMAC':>9s} {'MAC ratio':>9s} {'naive GF/s':>10s} {'fast GF/s':>9s} "
        f"{'naive MB':>8s} {'fast MB':>8s}"
    )
    for fact in range(min(args.facts, len(FACTS))):
        for kind in args.kinds.split(","):
            fast = run_child("fast", fact, kind)
            naive = run_child("naive", fact, kind)
            diff = float(np.abs(np.array(fast["table"]) - np.array(naive["table"])).max())
            row = {
                "fact": fast["fact"],
                "kind": kind,
                "tokens": fast["tokens"],
                "naive_seconds": naive["seconds"],
                "fast_seconds": fast["seconds"],
                "speedup": naive["seconds"] / fast["seconds"],
                "max_abs_diff": diff,
                "naive_macs": naive["macs"],
                "fast_macs": fast["macs"],
                "mac_ratio": naive["macs"] / fast["macs"],
                "naive_gflops": naive["gflops"],
                "fast_gflops": fast["gflops"],
                "naive_peak_rss_mb": naive["peak_rss_mb"],
                "fast_peak_rss_mb": fast["peak_rss_mb"],
                "model_rss_mb": fast["model_rss_mb"],
                "threads": fast["threads"],
            }
            rows.append(row)
            print(
                f"{row['fact'][:46]:46s} {kind:6s} {row['naive_seconds']:8.1f} {row['fast_seconds']:7.1f} "
                f"{row['speedup']:6.2f} {diff:9.2e} {row['naive_macs'] / 1e9:10.1f} {row['fast_macs'] / 1e9:9.1f} "
                f"{row['mac_ratio']:9.2f} {row['naive_gflops']:10.1f} {row['fast_gflops']:9.1f} "
                f"{row['naive_peak_rss_mb']:8.0f} {row['fast_peak_rss_mb']:8.0f}",
                flush=True,
            )
    for kind in args.kinds.split(","):
        mine = [r for r in rows if r["kind"] == kind]
        total_naive = sum(r["naive_seconds"] for r in mine)
        total_fast = sum(r["fast_seconds"] for r in mine)
        print(
            f"{kind}: overall speed-up {total_naive / total_fast:.2f}x, "
            f"max diff {max(r['max_abs_diff'] for r in mine):.2e}"
        )
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
