"""ROME benchmark: edit latency (statistics cached and not), peak memory, and the CounterFact table (ES, PS,
NS, generation efficacy / rewrite / bleed / keeps-true from the greedy texts, fluency) for none / ft / rome /
memit (one request, spread over MEMIT's layers) / paper on the project's set, side by side; `paper` is the
published ROME code's settings (core.rome.PAPER) on the same model and cases. Ablations of the project's
settings (one change each) are further runs by name.

    PYTHONPATH=. python bench/edit.py --no-latency --runs none,ft,rome,memit,paper   # the table, all 94 cases
    PYTHONPATH=. python bench/edit.py --no-latency --runs rome,ctx10+10,stop-nll --every 3   # ablations
    PYTHONPATH=. python bench/edit.py --measure-layer 20
    PYTHONPATH=. python bench/edit.py --show A.json B.json   # stored runs side by side, over their common cases
                                                              # (and their texts by prompt kind)

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
from dataclasses import asdict, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pandas as pd
import torch

from core.commands.common import to_jsonable, write_json
from core.counterfact import PROJECT_FILE, load_counterfact
from core.covariance import DEFAULT_TOKENS, key_statistics
from core.edit_site import default_layer, measure_layer
from core.edits import EditRequest
from core.evaluation import CaseResult, FTHyperParams, evaluate_case, held_out, naming_rates, summarise
from core.models import load_model
from core.rome import PAPER, RomeHyperParams, compute_edit

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
    """Edit seconds with statistics cached (and, unless told not to, the statistics from scratch). Each edit
    runs with `hp` and again with the value optimisation in float32 (`value_precision="model"`), one after the
    other, so the ratio is measured on the same machine state; how far apart the two are is printed with it
    (the relative difference of delta's norm, the cosine of the updates' v)."""
    layer = default_layer(lm) if hp.layer is None else hp.layer
    if uncached:
        uncached_statistics(lm, layer, hp)
    key_statistics(lm, layer, hp.stats_corpus, hp.stats_tokens)  # the real cache (computed once if missing)
    exact = replace(hp, value_precision="model")
    compute_edit(lm, REQUESTS[0], hp)  # warm-up: context texts, allocator
    rows = []
    for request in REQUESTS:
        edit, reference = compute_edit(lm, request, hp), compute_edit(lm, request, exact)
        rows.append(
            {
                "edit": request.text + " -> " + request.target_new,
                "wall s": edit.info["seconds"],
                "cpu s": edit.info["cpu_seconds"],
                "steps": edit.info["steps"],
                "float32 wall s": reference.info["seconds"],
                "delta norm vs float32": abs(edit.info["delta_norm"] / reference.info["delta_norm"] - 1),
                "v cosine": float(torch.nn.functional.cosine_similarity(edit.v.float(), reference.v.float(), dim=0)),
            }
        )
    table = pd.DataFrame(rows)
    print(table.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    print(
        f"edit, statistics cached: median {statistics.median(table['wall s']):.2f} s wall, "
        f"{statistics.median(table['cpu s']):.2f} s CPU (value precision {hp.value_precision}); float32 values: "
        f"median {statistics.median(table['float32 wall s']):.2f} s wall; peak RSS so far {peak_rss_mib():.0f} MiB"
    )


def ablations(base: RomeHyperParams) -> dict[str, RomeHyperParams]:
    """Named one-change variants of the project's settings (and the paper's settings as `paper`)."""
    return {
        "paper": replace(PAPER, layer=base.layer, stats_tokens=base.stats_tokens),
        "ctx5+5": replace(base, context_lengths=((5, 5), (10, 5))),
        "ctx10+10": replace(base, context_lengths=((5, 10), (10, 10))),
        "stop-nll": replace(base, early_stop="nll"),
        "stop-nll-0.01": replace(base, early_stop="nll", early_stop_loss=1e-2),
        "stop-loss": replace(base, early_stop="loss"),
        "stop-none": replace(base, early_stop="none"),
        "solve-mean": replace(base, solve_at="mean"),
        "solve-plain": replace(base, solve_at="plain"),
        "solve-both": replace(base, solve_at="both"),
        "key-strongest": replace(base, key_token="strongest"),
        "layer3": replace(base, layer=3),
        "layer4": replace(base, layer=4),
        "kl0": replace(base, kl_factor=0.0),
        "kl0.25": replace(base, kl_factor=0.25),
        "clamp2": replace(base, clamp_norm_factor=2.0),
        "clamp10": replace(base, clamp_norm_factor=10.0),
        "identity-C": replace(base, stats_corpus="identity"),
        "preserve0": replace(base, preserve_weight=0.0),
        "preserve3": replace(base, preserve_weight=3.0),
        "float32": replace(base, value_precision="model"),
    }


def stored_runs(paths: list[str]) -> dict[str, list[CaseResult]]:
    """Per-case results of stored runs, by label: a `--json` file of this bench ({label: result}) or one
    `python -m core evaluate --json` result (labelled by its file name)."""
    runs = {}
    for path in paths:
        data = json.loads(Path(path).read_text())
        for label, result in ({Path(path).stem: data} if "cases" in data else data).items():
            runs[label] = [CaseResult(**case) for case in result["cases"]]
    return runs


HIDDEN = ("method", "efficacy_magnitude", "paraphrase_magnitude", "neighborhood_magnitude", "mean_edit_cpu_seconds")


def common_cases(runs: dict[str, list[CaseResult]]) -> dict[str, list[CaseResult]]:
    """Each run's cases among those every run measured (by case id): runs of different subsets side by side."""
    common = set.intersection(*({c.case_id for c in cases} for cases in runs.values()))
    return {label: [c for c in cases if c.case_id in common] for label, cases in runs.items()}


def common_table(runs: dict[str, list[CaseResult]]) -> pd.DataFrame:
    """Each run's row over the cases every run measured."""
    rows = []
    for label, kept in common_cases(runs).items():
        row = summarise("rome", kept, any(c.fluency is not None for c in kept), 0.0).row()
        rows.append({"run": label, **{k: v for k, v in row.items() if k not in HIDDEN}})
    return pd.DataFrame(rows)


def naming_table(runs: dict[str, list[CaseResult]]) -> pd.DataFrame:
    """Each run's texts by prompt kind over the common cases (core.evaluation.naming_rates): how often the
    texts after the edit name the new object, beside how often the unedited model's name the true one."""
    return pd.DataFrame([{"run": label, **naming_rates(kept)} for label, kept in common_cases(runs).items()])


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
    parser.add_argument("--every", type=int, default=1, help="every K-th case (a spread subset for ablations)")
    parser.add_argument("--offset", type=int, default=0, help="with --every: start at this case (0-based)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--layer", type=int, default=None)
    parser.add_argument("--stats-tokens", type=int, default=DEFAULT_TOKENS)
    parser.add_argument("--fluency-tokens", type=int, default=40)
    parser.add_argument(
        "--runs",
        default="none,ft,rome,memit,paper",
        help="comma-separated: none, ft, rome, memit, or an ablation name (see --list)",
    )
    parser.add_argument("--list", action="store_true", help="list the ablation names and exit")
    parser.add_argument(
        "--show",
        nargs="+",
        metavar="JSON",
        help="print the table of stored runs (this bench's --json, evaluate's --json) over their common cases",
    )
    parser.add_argument("--no-latency", action="store_true")
    parser.add_argument("--json", dest="json_out", help="write every run's full result (per case) here")
    parser.add_argument("--cached-only", action="store_true", help="latency: skip computing statistics from scratch")
    parser.add_argument(
        "--measure-layer",
        type=int,
        metavar="FACTS",
        default=0,
        help="measure the default layer from causal traces of this many known facts, then exit",
    )
    args = parser.parse_args()
    if args.show:
        if missing := [path for path in args.show if not Path(path).is_file()]:
            parser.error(f"no such file: {', '.join(missing)}")
        runs = stored_runs(args.show)
        print(common_table(runs).to_string(index=False, float_format=lambda x: f"{x:.3f}"))
        print("\ntexts naming the new object after the edit / the true object before it, by prompt kind:")
        print(naming_table(runs).to_string(index=False, float_format=lambda x: f"{x:.3f}"))
        return
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
    if args.list:
        for name, variant in ablations(hp).items():
            print(name, variant)
        return
    if not args.no_latency:
        latency(lm, hp, uncached=not args.cached_only)
    cases = load_counterfact(args.data, args.limit)[args.offset :: args.every]
    print(
        f"evaluation set {args.data}: {len(cases)} cases, layer {default_layer(lm) if hp.layer is None else hp.layer}"
    )
    hp = held_out(hp, cases)  # the preserved catalogue never holds the subjects measured
    variants = ablations(hp)
    runs = []
    for name in (n for n in args.runs.split(",") if n and n != "-"):
        if name in ("none", "ft", "rome", "memit"):
            runs.append((name, name, hp))
        elif name in variants:
            runs.append((name, "rome", variants[name]))
        else:
            parser.error(f"unknown run {name!r}: use none, ft, rome or one of {', '.join(variants)}")
    result = table(lm, cases, runs, args.fluency_tokens, args.json_out)
    print()
    print(result.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    print(f"peak RSS {peak_rss_mib():.0f} MiB")


if __name__ == "__main__":
    main()
