"""ROME benchmark: edit latency (statistics cached and not), peak memory, and the CounterFact table for
none / ft / rome on the project's set; optional side-by-side measurements of the design choices.

    PYTHONPATH=. python bench/edit.py [--limit N] [--threads 2]
    PYTHONPATH=. python bench/edit.py --limit 20 --compare-keys --compare-covariance
    PYTHONPATH=. python bench/edit.py --measure-layer 20

Times are wall-clock and CPU (process) seconds: on a shared machine the CPU seconds with --threads 1 are
what a quiet core would take.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pandas as pd
import torch

from core.commands.common import to_jsonable, write_json
from core.counterfact import PROJECT_FILE, load_counterfact
from core.covariance import DEFAULT_TOKENS, key_statistics
from core.edits import EditRequest
from core.evaluation import FTHyperParams, evaluate_case, summarise
from core.models import load_model
from core.rome import RomeHyperParams, compute_edit, default_layer, measure_layer

REQUESTS = [
    EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome"),
    EditRequest("The capital of {} is", "Germany", "Madrid"),
    EditRequest("{} is located in the country of", "Mount Fuji", "Brazil"),
]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def uncached_statistics(lm, layer: int, hp: RomeHyperParams) -> None:
    """Statistics from scratch (corpus generation included), in a throwaway cache folder."""
    saved = os.environ.get("ROME_STUDIO_CACHE")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["ROME_STUDIO_CACHE"] = tmp
        try:
            wall, cpu = time.perf_counter(), time.process_time()
            stats = key_statistics(lm, layer, hp.stats_corpus, hp.stats_tokens)
            print(
                f"statistics, not cached: {time.perf_counter() - wall:.1f} s wall, "
                f"{time.process_time() - cpu:.1f} s CPU "
                f"({stats.count} keys, layer {layer}, corpus {hp.stats_corpus}, corpus generation included)"
            )
        finally:
            if saved is None:
                os.environ.pop("ROME_STUDIO_CACHE")
            else:
                os.environ["ROME_STUDIO_CACHE"] = saved


def latency(lm, hp: RomeHyperParams, uncached: bool = True) -> None:
    layer = default_layer(lm) if hp.layer is None else hp.layer
    if uncached:
        uncached_statistics(lm, layer, hp)
    key_statistics(lm, layer, hp.stats_corpus, hp.stats_tokens)  # the real cache (computed once if missing)
    compute_edit(lm, REQUESTS[0], hp)  # warm-up: context texts, allocator
    rows = []
    for request in REQUESTS:
        edit = compute_edit(lm, request, hp)
        rows.append(
            {
                "edit": request.text + " -> " + request.target_new,
                "wall s": edit.info["seconds"],
                "cpu s": edit.info["cpu_seconds"],
                "steps": edit.info["steps"],
            }
        )
    table = pd.DataFrame(rows)
    print(table.to_string(index=False, float_format=lambda x: f"{x:.2f}"))
    print(
        f"edit, statistics cached: median {statistics.median(table['wall s']):.2f} s wall, "
        f"{statistics.median(table['cpu s']):.2f} s CPU; peak RSS so far {peak_rss_mib():.0f} MiB"
    )


def table(
    lm, cases, runs: list[tuple[str, str, RomeHyperParams]], fluency_tokens: int, json_out: str | None = None
) -> pd.DataFrame:
    rows, full = [], {}
    for label, method, hp in runs:
        started = time.perf_counter()
        done = []
        for i, case in enumerate(cases):  # case by case, each printed at once (long runs can be watched)
            done.append(evaluate_case(lm, case, method, hp, FTHyperParams(layer=hp.layer), fluency_tokens, seed=i))
            print(f"{label} case {i + 1}/{len(cases)}: {json.dumps(to_jsonable(asdict(done[-1])))}", flush=True)
        result = summarise(method, done, fluency_tokens > 0, time.perf_counter() - started)
        row = {"run": label, **result.row(), "skipped": result.skipped, "seconds": time.perf_counter() - started}
        rows.append(row)
        full[label] = result.to_json()
        if json_out:
            write_json(json_out, full)
        print(pd.DataFrame([row]).to_string(index=False, float_format=lambda x: f"{x:.3f}"), flush=True)
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(PROJECT_FILE))
    parser.add_argument("--limit", type=int, default=None, help="first N cases of the evaluation set")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--layer", type=int, default=None)
    parser.add_argument("--stats-tokens", type=int, default=DEFAULT_TOKENS)
    parser.add_argument("--fluency-tokens", type=int, default=40)
    parser.add_argument("--methods", default="none,ft,rome")
    parser.add_argument("--no-latency", action="store_true")
    parser.add_argument("--json", dest="json_out", help="write every run's full result (per case) here")
    parser.add_argument("--cached-only", action="store_true", help="latency: skip computing statistics from scratch")
    parser.add_argument("--compare-keys", action="store_true", help="rome with key token last vs strongest")
    parser.add_argument("--compare-covariance", action="store_true", help="rome with generated vs identity C")
    parser.add_argument(
        "--measure-layer",
        type=int,
        metavar="FACTS",
        default=0,
        help="measure the default layer from causal traces of this many known facts, then exit",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model(device="cpu")
    print(f"model {lm.name}, {args.threads} thread(s), RSS after load {peak_rss_mib():.0f} MiB")
    if args.measure_layer:
        from core.facts import load_facts

        layer, row = measure_layer(lm, load_facts(), limit=args.measure_layer)
        print("AIE (mlp, last subject token) by layer:", " ".join(f"{x:.3f}" for x in row))
        print(f"peak layer: {layer}")
        return
    hp = RomeHyperParams(layer=args.layer, stats_tokens=args.stats_tokens)
    if not args.no_latency:
        latency(lm, hp, uncached=not args.cached_only)
    cases = load_counterfact(args.data, args.limit)
    print(
        f"evaluation set {args.data}: {len(cases)} cases, layer {default_layer(lm) if hp.layer is None else hp.layer}"
    )
    runs = [(m, m, hp) for m in args.methods.split(",") if m and m != "-"]
    if args.compare_keys:
        runs.append(
            (
                "rome key=strongest",
                "rome",
                RomeHyperParams(layer=args.layer, stats_tokens=args.stats_tokens, key_token="strongest"),
            )
        )
    if args.compare_covariance:
        runs.append(
            (
                "rome C=identity",
                "rome",
                RomeHyperParams(layer=args.layer, stats_tokens=args.stats_tokens, stats_corpus="identity"),
            )
        )
    result = table(lm, cases, runs, args.fluency_tokens, args.json_out)
    print()
    print(result.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    print(f"peak RSS {peak_rss_mib():.0f} MiB")


if __name__ == "__main__":
    main()
