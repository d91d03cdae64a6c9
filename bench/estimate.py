"""How well the estimate engine agrees with the exact (fast) tables, and how long it takes, on the embedded model.

Cases the estimate was not tuned on: facts from data/known_facts.json (from record 40 on, the first ones whose
clean answer starts the recorded attribute) and tweets from ../shared/data/tweeteval_sentiment/dev.tsv (the
first non-neutral ones of at most --max-tweet-tokens tokens with the suffix, traced with the project's
"I am feeling" proxy). For each case and kind, per reading of the estimate (plain AtP in probability space,
the same step in log-odds, and log-odds with its --verify strongest cells computed exactly):
  - Spearman rank correlation with the exact table over the cells from the corrupted span on,
  - whether the peak cell, the peak token and the peak layer (within +-2) agree, and the peak layer distance,
  - top-10 overlap (cells with the largest effect towards the clean score).
Then the seconds of the estimate (all three kinds) for a 48-token text, against the exact engine's forecast.

    .venv/bin/python bench/estimate.py [--facts 4] [--tweets 4] [--verify 10] [--json out/bench_estimate.json]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

TWEETS = ROOT.parent / "shared" / "data" / "tweeteval_sentiment" / "dev.tsv"
LONG_TEXT = (
    "The new phone arrived two days late, the box was dented and the charger was missing, but the screen is "
    "bright, the battery lasts all day, the camera takes lovely photos in the evening light and the speakers are "
    "loud enough for a small room"
)


def agreement(setup, estimate: np.ndarray, exact: np.ndarray, top: int = 10) -> dict:
    from scipy.stats import spearmanr

    start = setup.corrupt_range[0]
    direction = 1.0 if setup.clean_score >= setup.corrupted_score else -1.0
    e = (estimate[start:] - setup.corrupted_score) * direction
    x = (exact[start:] - setup.corrupted_score) * direction
    rho = float(spearmanr(e.ravel(), x.ravel()).statistic)
    pe, px = np.unravel_index(np.argmax(e), e.shape), np.unravel_index(np.argmax(x), x.shape)
    top_e = set(np.argsort(-e, axis=None)[:top].tolist())
    top_x = set(np.argsort(-x, axis=None)[:top].tolist())
    return {
        "spearman": rho,
        "peak_cell": bool(pe == px),
        "peak_token": bool(pe[0] == px[0]),
        "peak_layer_distance": int(abs(int(pe[1]) - int(px[1]))),
        "peak_band": bool(pe[0] == px[0] and abs(int(pe[1]) - int(px[1])) <= 2),
        "top10_overlap": len(top_e & top_x),
        "exact_at_estimate_peak": float(x[pe] / x.max()) if x.max() > 0 else float("nan"),
    }


def fact_cases(lm, n: int, first: int = 40) -> list[tuple[str, str]]:
    from core.trace_setup import prepare

    records = json.loads((ROOT / "data" / "known_facts.json").read_text())
    cases = []
    for record in records[first:]:
        if len(cases) >= n:
            break
        setup = prepare(lm, record["prompt"], record["subject"], samples=1)
        if record["attribute"].lower().startswith(setup.answer.strip().lower()) and setup.answer.strip():
            cases.append((record["prompt"], record["subject"]))
    return cases


def tweet_cases(lm, proxy, n: int, max_tokens: int) -> list[str]:
    from core.sentiment_trace import text_token_range

    if not TWEETS.exists():
        print(f"(no tweets: {TWEETS} is absent)")
        return []
    texts = []
    with TWEETS.open(encoding="utf-8") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            if len(texts) >= n:
                break
            if row["label"] == "neutral":
                continue
            ids, _ = text_token_range(lm, row["text"], proxy.suffix)
            if len(ids) <= max_tokens:
                texts.append(row["text"])
    return texts


def measure(setup, label: str, kinds: tuple[str, ...], verify: int) -> list[dict]:
    import torch

    from core.estimate_tracing import estimate_kind, estimate_table, record_gradients
    from core.fast_tracing import fast_kind, record_runs
    from core.trace_cost import estimated_seconds

    with torch.no_grad():
        started = time.perf_counter()
        runs = record_runs(setup, kinds)
        exact, exact_seconds = {}, {}
        for kind in kinds:
            t = time.perf_counter()
            exact[kind] = fast_kind(setup, kind, runs=runs)
            exact_seconds[kind] = time.perf_counter() - t
        exact_total = time.perf_counter() - started
    forecast = estimated_seconds(setup, "fast", kinds)
    t = time.perf_counter()
    gradients = record_gradients(setup, kinds)
    plain = {kind: estimate_table(setup, gradients, kind) for kind in kinds}
    estimate_seconds = time.perf_counter() - t
    t = time.perf_counter()
    gradients.verify = verify
    verified = {kind: estimate_kind(setup, kind, gradients=gradients) for kind in kinds}
    verify_seconds = time.perf_counter() - t
    rows = []
    for kind in kinds:
        readings = {
            "linear": estimate_table(setup, gradients, kind, space="linear"),
            "log-odds": plain[kind],
            f"log-odds+verify{verify}": verified[kind],
        }
        for reading, table in readings.items():
            rows.append(
                {
                    "case": label,
                    "kind": kind,
                    "reading": reading,
                    "tokens": setup.num_tokens,
                    **agreement(setup, table, exact[kind]),
                    "exact_seconds": exact_seconds[kind],
                }
            )
    print(
        f"  {label[:60]!r}: {setup.num_tokens} tokens, exact {exact_total:.1f} s (forecast {forecast:.1f} s), "
        f"estimate {estimate_seconds:.2f} s, verifying {verify} cells x {len(kinds)} kinds {verify_seconds:.1f} s",
        flush=True,
    )
    for row in rows:
        print(
            f"    {row['kind']:6s} {row['reading']:20s} rho {row['spearman']:+.2f}  peak cell {row['peak_cell']!s:5s} "
            f"token {row['peak_token']!s:5s} layer dist {row['peak_layer_distance']:2d}  "
            f"top10 {row['top10_overlap']:2d}/10  "
            f"exact at est. peak {row['exact_at_estimate_peak']:.2f}",
            flush=True,
        )
    for row in rows:
        row.update(
            estimate_seconds=estimate_seconds,
            verify_seconds=verify_seconds,
            exact_total_seconds=exact_total,
            exact_forecast_seconds=forecast,
        )
    return rows


def timing(lm, proxy, kinds: tuple[str, ...], repeats: int = 2) -> dict:
    """Seconds of the estimate (prepare included) for a 48-token text, all kinds."""
    from core.estimate_tracing import estimate_table, record_gradients
    from core.sentiment_trace import sentiment_setup, text_token_range
    from core.trace_cost import estimated_seconds

    words = LONG_TEXT.split()
    text = LONG_TEXT
    while len(text_token_range(lm, text, proxy.suffix)[0]) > 48:  # the longest prefix of whole words <= 48 tokens
        words = words[:-1]
        text = " ".join(words)
    tokens = len(text_token_range(lm, text, proxy.suffix)[0])
    best, cpu = float("inf"), float("inf")
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        setup, _ = sentiment_setup(lm, text, proxy, engine="estimate")
        gradients = record_gradients(setup, kinds)
        for kind in kinds:
            estimate_table(setup, gradients, kind)
        best, cpu = min(best, time.perf_counter() - t), min(cpu, time.process_time() - c)
    forecast = estimated_seconds(setup, "fast", kinds)
    load = os.getloadavg()[0]
    print(
        f"48-token timing: a {tokens}-token prompt, estimate of {', '.join(kinds)}: {best:.2f} s wall, {cpu:.2f} s CPU "
        f"(best of {repeats}, {os.cpu_count()} cores, load average {load:.1f}); the exact engine's forecast: "
        f"{forecast:.0f} s"
    )
    return {
        "tokens": tokens,
        "estimate_seconds": best,
        "estimate_cpu_seconds": cpu,
        "load_average": load,
        "exact_forecast_seconds": forecast,
    }


def summary(rows: list[dict]) -> dict:
    out = {}
    for reading in dict.fromkeys(r["reading"] for r in rows):
        for kind in dict.fromkeys(r["kind"] for r in rows):
            for group in ("fact", "tweet", "all"):
                mine = [
                    r for r in rows if r["reading"] == reading and r["kind"] == kind and group in (r["group"], "all")
                ]
                if not mine:
                    continue
                out[f"{group}/{kind}/{reading}"] = {
                    "n": len(mine),
                    "spearman_mean": float(np.mean([r["spearman"] for r in mine])),
                    "spearman_min": float(np.min([r["spearman"] for r in mine])),
                    "peak_cell": sum(r["peak_cell"] for r in mine),
                    "peak_token": sum(r["peak_token"] for r in mine),
                    "peak_band": sum(r["peak_band"] for r in mine),
                    "top10_overlap_mean": float(np.mean([r["top10_overlap"] for r in mine])),
                }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--facts", type=int, default=4)
    parser.add_argument("--tweets", type=int, default=4)
    parser.add_argument("--max-tweet-tokens", type=int, default=16, help="with the suffix (exact cost ~ length^2)")
    parser.add_argument("--first-fact", type=int, default=40, help="facts are taken from this record on")
    parser.add_argument(
        "--samples", type=int, default=10, help="noisy copies (the exact engine's cost is linear in it)"
    )
    parser.add_argument("--verify", type=int, default=10, help="cells per kind the hybrid computes exactly")
    parser.add_argument("--kinds", default="hidden,mlp,attn")
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="torch threads (timing on one core: 1)"
    )
    parser.add_argument("--json", dest="json_out")
    args = parser.parse_args()

    import torch

    from core.models import load_model
    from core.sentiment_trace import default_proxy, sentiment_setup
    from core.trace_setup import prepare

    torch.set_num_threads(max(1, args.threads))
    kinds = tuple(args.kinds.split(","))
    lm = load_model(device="cpu")
    proxy = default_proxy(lm)
    rows = []

    def save(**more) -> None:  # after every case, so that a long run leaves what it measured
        if args.json_out:
            Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json_out).write_text(json.dumps({"rows": rows, "summary": summary(rows), **more}, indent=1))

    print(f"facts ({args.facts}):", flush=True)
    for prompt, subject in fact_cases(lm, args.facts, args.first_fact):
        for row in measure(prepare(lm, prompt, subject, samples=args.samples), prompt, kinds, args.verify):
            rows.append({**row, "group": "fact"})
        save()
    print(f"tweets ({args.tweets}):", flush=True)
    for text in tweet_cases(lm, proxy, args.tweets, args.max_tweet_tokens):
        setup, _ = sentiment_setup(lm, text, proxy, samples=args.samples)
        for row in measure(setup, text, kinds, args.verify):
            rows.append({**row, "group": "tweet"})
        save()
    totals = summary(rows)
    print("summary (mean rank correlation [min], peak cell / token / band agreement, mean top-10 overlap):")
    for key, s in totals.items():
        print(
            f"  {key:36s} rho {s['spearman_mean']:+.2f} [{s['spearman_min']:+.2f}]  peak {s['peak_cell']}/{s['n']} "
            f"token {s['peak_token']}/{s['n']} band {s['peak_band']}/{s['n']}  top10 {s['top10_overlap_mean']:.1f}"
        )
    save(timing=timing(lm, proxy, kinds))


if __name__ == "__main__":
    main()
