"""Many edits: plain sequential ROME, the projected editor (AlphaEdit) and MEMIT, side by side.

    PYTHONPATH=. python bench/many.py table [--limit N] [--methods ROWS] [--json OUT]   # on the project's set
    PYTHONPATH=. python bench/many.py curve --limit 1000 --every 50 [--json OUT]   # ROME vs AlphaEdit, known facts
    PYTHONPATH=. python bench/many.py show A.json B.json ...                  # the table of `edit-many --json` files
    PYTHONPATH=. python bench/many.py replay EDITS.safetensors --limit N      # re-measure exported edits, all applied
    PYTHONPATH=. python bench/many.py batch [--limit N] [--threads 2]          # time one MEMIT batch, and its step 1

`table` runs `core.many.edit_many` for each row of `ROWS` (default: all but memit-seq) on
data/counterfact_project.json (all edits applied, then measured): rome and alphaedit one edit after another,
memit as one batch, memit-seq in batches of 1, memit-null in batches of 1 with AlphaEdit's null-space solve.
`curve` builds sequential edits from data/known_facts.json (each fact's object replaced by the next different
object of the same relation; neighbourhood prompts: other facts of the relation with the same true object) and
prints the curve of ROME and AlphaEdit: efficacy of all edits so far, neighbourhood,
fluency, norm of the accumulated update. The file has 409 facts: `--limit` above that cycles through them
again with the object after that (re-editing edited facts: the scores count each fact's latest edit).
`--time-budget S`: each method stops starting edits after S seconds and is measured over the cases it saw.
`--checkpoint DIR`: each method's run is kept in DIR/METHOD after every curve point (core.checkpoint), and
the same command goes on from there: the curve to 1,000 edits can be drawn over several processes, machines
or days (bench/results/curve_known/METHOD holds this project's runs: CPU, then an H200). A run's identity holds
the value products it began with (core.rome.value_products): those runs are float32, so on a CPU that would
use bfloat16 products they go on with `--value-precision model`.

`batch` times one MEMIT batch of the project's cases (statistics cached first), then MEMIT's step 1 alone two
ways in the same run: each fact's value optimisation alone (`batch_rows=1`, the naive reference) and many facts
sharing each forward pass (the default); it prints the times, their ratio, the largest difference between the
two ways' deltas (relative to the delta's norm) and the process's peak memory.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from core.alphaedit import AlphaEditParams
from core.commands.common import to_jsonable
from core.counterfact import PROJECT_FILE, CounterFactCase, load_counterfact
from core.edits import applied, import_edits
from core.facts import DEFAULT_FACTS, load_facts
from core.many import ManyParams, edit_many, generation_efficacy, method_rome, request_of, score_cases, update_norm
from core.memit import VALUE_BATCH_ROWS, VALUE_SETTINGS, MemitParams, default_layers, memit_batch, target_deltas
from core.models import load_model
from core.prompts import find_subject_chars
from core.rome import VALUE_PRECISIONS

ROWS = {  # the table's rows: name -> the run's settings (curve points and time budget from the command line)
    "rome": ManyParams(method="rome"),
    "alphaedit": ManyParams(method="alphaedit"),
    "memit": ManyParams(method="memit"),
    "memit-seq": ManyParams(method="memit", batch_size=1),
    "memit-null": ManyParams(method="memit", batch_size=1, memit=MemitParams(null_space=AlphaEditParams())),
}
DEFAULT_ROWS = {"table": "rome,alphaedit,memit,memit-null", "curve": "rome,alphaedit"}
COLUMNS = (
    "row",
    "n",
    "efficacy",
    "paraphrase",
    "neighborhood",
    "generation_efficacy",
    "fluency",
    "fluency_unedited",
    "update_norm",
    "edit_seconds",
    "seconds",
)


def known_fact_cases(path: str | Path = DEFAULT_FACTS, limit: int = 1000) -> list[CounterFactCase]:
    """CounterFact-style cases from a facts file (see the module docstring)."""
    facts = load_facts(path)
    by_relation: dict[str, list] = {}
    for fact in facts:
        by_relation.setdefault(fact.relation, []).append(fact)
    cases = []
    for round_ in range(-(-limit // len(facts))):
        for i, fact in enumerate(facts):
            peers = by_relation[fact.relation]
            objects = sorted({p.attribute for p in peers} - {fact.attribute})
            if not objects:
                continue
            new = objects[(i + round_) % len(objects)]
            start, end = find_subject_chars(fact.prompt, fact.subject)
            neighbours = tuple(p.prompt for p in peers if p is not fact and p.attribute == fact.attribute)[:3]
            cases.append(
                CounterFactCase(
                    case_id=f"{round_}-{i}",
                    prompt=fact.prompt[:start] + "{}" + fact.prompt[end:],
                    subject=fact.subject,
                    target_new=new,
                    target_true=fact.attribute,
                    relation_id=fact.relation,
                    paraphrase_prompts=(),
                    neighborhood_prompts=neighbours,
                    attribute_prompts=(),
                    generation_prompts=(f"{fact.subject} is",),
                )
            )
    return cases[:limit]


def row_name(data: dict) -> str:
    """The table row an `edit-many --json` file belongs to (ROWS' names; memit-N: batches of N)."""
    size = data.get("batch_size")
    if data.get("null_space"):
        return f"{data['method']}-null"
    if size:
        return f"{data['method']}-" + ("seq" if size == 1 else str(size))
    return data["method"]


def print_table(rows: list[dict]) -> None:
    print(" | ".join(f"{c:>13}" for c in COLUMNS))
    for row in rows:
        cells = []
        for c in COLUMNS:
            v = row.get(c)
            cells.append(f"{v:>13.3f}" if isinstance(v, float) else f"{str(v):>13}")
        print(" | ".join(cells))


def print_curves(results: dict[str, dict]) -> None:
    for method, result in results.items():
        print(f"\n{method}: edits, ES, PS, NS, fluency, update norm, seconds")
        for p in result["curve"]:
            flu = "-" if p["fluency"] is None else f"{p['fluency']:.3f}"
            print(
                f"  {p['edits']:>5} {p['efficacy']:.3f} {p['paraphrase']:.3f} {p['neighborhood']:.3f} {flu} "
                f"{p['update_norm']:.2f} {p['seconds']:.0f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("table", "curve", "show", "replay", "batch"))
    parser.add_argument("files", nargs="*", help="show: edit-many JSON files; replay: one exported edits file")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--every", type=int, default=10, help="a curve point after every N edits")
    parser.add_argument("--methods", default=None, help="comma-separated rows of ROWS (default: see the docstring)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    parser.add_argument("--time-budget", type=float, default=None, help="seconds per method (core.many)")
    parser.add_argument(
        "--value-precision",
        choices=VALUE_PRECISIONS,
        default="auto",
        help="ROME's value products (core.rome.value_products; part of a checkpoint's identity)",
    )
    parser.add_argument("--checkpoint", metavar="DIR", help="curve/table: keep each method's run in DIR/METHOD")
    parser.add_argument("--json", dest="json_out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.mode == "show":
        results = {}
        for name in args.files:
            data = json.loads(Path(name).read_text())
            row = row_name(data)
            results[row] = {"row": row, **data}
        print_table(list(results.values()))
        print_curves(results)
        return
    methods = [m for m in (args.methods or DEFAULT_ROWS.get(args.mode, "")).split(",") if m]  # table, curve
    unknown = sorted(set(methods) - set(ROWS))
    if unknown:
        parser.error(f"unknown rows {unknown}: use {', '.join(ROWS)}")
    lm = load_model(device=args.device)
    if args.mode == "replay":
        cases = load_counterfact(PROJECT_FILE, args.limit)
        edits = import_edits(args.files[0], lm)
        edited = {e.request.subject for e in edits}
        cases = [c for c in cases if c.subject in edited]
        with applied(lm, edits):
            scores = score_cases(lm, cases).means()
            scores["generation_efficacy"] = generation_efficacy(lm, cases)
        scores.update({"edits": len(edits), "cases": len(cases), "update_norm": update_norm(edits)})
        print(json.dumps(scores, indent=1))
        return
    if args.mode == "batch":
        time_batch(lm, load_counterfact(PROJECT_FILE, args.limit), args.json_out)
        return
    if args.mode == "table":
        cases = load_counterfact(PROJECT_FILE, args.limit)
    else:
        cases = known_fact_cases(limit=args.limit or 1000)
    results = {}
    for method in methods:
        params = replace(ROWS[method], curve_every=args.every, time_budget=args.time_budget)
        params = replace(params, rome=replace(method_rome(params), value_precision=args.value_precision))
        folder = Path(args.checkpoint) / method if args.checkpoint else None
        result, _ = edit_many(
            lm, cases, params, on_point=lambda p, m=method: print(m, p, flush=True), checkpoint=folder
        )
        results[method] = {"row": method, **to_jsonable(result.to_json())}
        if args.json_out:  # after each method, so a stopped run keeps the finished ones
            Path(args.json_out).write_text(json.dumps(results, indent=1) + "\n")
    print_table(list(results.values()))
    print_curves(results)


def time_batch(lm, cases: list[CounterFactCase], json_out: str | None) -> None:
    requests = [request_of(c) for c in cases]
    memit_batch(lm, requests[:1])  # statistics and context texts cached, as in any later batch
    started = time.perf_counter()
    batch = memit_batch(lm, requests)
    whole = time.perf_counter() - started
    last = default_layers(lm)[-1]
    timed = {}
    for name, rows in (("alone", 1), ("together", VALUE_BATCH_ROWS)):
        started = time.perf_counter()
        found, _ = target_deltas(lm, batch.requests, last, VALUE_SETTINGS, batch_rows=rows)
        timed[name] = (time.perf_counter() - started, found)
    difference = ((timed["alone"][1] - timed["together"][1]).norm(dim=1) / timed["alone"][1].norm(dim=1)).max()
    result = {
        "facts": len(requests),
        "edited": len(batch.kept),
        "batch_seconds": round(whole, 1),
        "step1_alone_seconds": round(timed["alone"][0], 1),
        "step1_together_seconds": round(timed["together"][0], 1),
        "step1_speedup": round(timed["alone"][0] / timed["together"][0], 2),
        "max_relative_delta_difference": float(difference),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(result, indent=1))
    if json_out:
        Path(json_out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
