"""Sentiment benchmarks on the TweetEval tweets (../shared/data/tweeteval_sentiment, binary: neutral dropped).

    python bench/sentiment.py accuracy      # feeling proxy and probe on dev (fit on train), every probe layer
    python bench/sentiment.py throughput    # batched + padded reading vs one text per forward, texts/s
    python bench/sentiment.py trace [--n 20] [--max-tokens 14] [--samples 3]
                                            # average sentiment trace over short dev tweets, by token category

`accuracy` uses the feature cache (the forward passes of `python -m core sentiment evaluate` are reused, so
re-running costs only the fits); its forward time is measured in `throughput` and by `sentiment evaluate`.
Each mode prints its figures and writes JSON to --out (default out/bench_sentiment_<mode>.json).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from core.commands.common import to_jsonable  # noqa: E402
from core.errors import UserError  # noqa: E402
from core.models import load_model  # noqa: E402
from core.sentiment import (  # noqa: E402
    FeelingProxy,
    HiddenProbe,
    confusion,
    extract_features,
    load_labelled,
    probe_layer_sweep,
    read_texts,
)

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "tweeteval_sentiment"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def accuracy(lm, args) -> dict:
    train, dev = load_labelled(DATA / "train.tsv"), load_labelled(DATA / "dev.tsv")
    layers = range(lm.num_layers)
    tf = extract_features(lm, train.texts, layers, cache=True)
    df = extract_features(lm, dev.texts, layers, cache=True)
    proxy = FeelingProxy.fit(lm, tf, train.labels)
    predicted = proxy.predict(lm, df)
    result = {
        "n_train": len(train),
        "n_dev": len(dev),
        "dev_counts": dev.counts(),
        "feeling": {"accuracy": float((predicted == dev.labels).mean()), "confusion": confusion(dev.labels, predicted)},
    }
    print(
        f"feeling proxy: dev accuracy {result['feeling']['accuracy']:.3f} (n={len(dev)}), "
        f"confusion {result['feeling']['confusion']} (rows true neg/pos, columns predicted)"
    )
    sweep = probe_layer_sweep(tf, train.labels)
    per_layer = {}
    for layer in layers:
        probe = HiddenProbe.fit(lm, tf, train.labels, layer)
        per_layer[layer] = float((probe.predict(lm, df) == dev.labels).mean())
    best = max(sweep, key=lambda l: (sweep[l], -l))
    probe = HiddenProbe.fit(lm, tf, train.labels, best)
    predicted = probe.predict(lm, df)
    result["probe"] = {
        "layer_by_train_cv": best,
        "accuracy": per_layer[best],
        "confusion": confusion(dev.labels, predicted),
        "train_cv": sweep,
        "dev_by_layer": per_layer,
        "best_dev_layer": max(per_layer, key=per_layer.get),
    }
    print(
        f"probe: layer {best} (chosen by 5-fold CV on train, {sweep[best]:.3f}): dev accuracy {per_layer[best]:.3f}, "
        f"confusion {result['probe']['confusion']}"
    )
    print("dev accuracy by layer: " + " ".join(f"{l}:{a:.3f}" for l, a in per_layer.items()))
    return result


def throughput(lm, args) -> dict:
    dev = load_labelled(DATA / "dev.tsv")
    texts = dev.texts[: args.n]
    one = read_texts(lm, texts, max_rows=1)
    batched = read_texts(lm, texts)
    diff = float(np.abs(one.final - batched.final).max())
    result = {
        "n": len(texts),
        "tokens": batched.tokens,
        "one_by_one_texts_per_second": one.texts_per_second,
        "batched_texts_per_second": batched.texts_per_second,
        "speedup": batched.texts_per_second / one.texts_per_second,
        "max_abs_diff_final_state": diff,
        "peak_rss_mb": peak_rss_mb(),
        "threads": torch.get_num_threads(),
    }
    print(
        f"{len(texts)} dev tweets ({batched.tokens} tokens): one per forward {one.texts_per_second:.2f} texts/s, "
        f"batched+padded {batched.texts_per_second:.2f} texts/s ({result['speedup']:.2f}x); "
        f"max |diff| of the final state {diff:.2e}; peak RSS {result['peak_rss_mb']:.0f} MB"
    )
    return result


def trace_average(lm, args) -> dict:
    from core.sentiment_trace import average_traces, default_proxy, text_token_range, trace_sentiment
    from core.trace_setup import score_json

    dev = load_labelled(DATA / "dev.tsv")
    proxy = default_proxy(lm, DATA / "train.tsv")
    chosen = []  # the first dev tweets (file order) short enough: no choice by outcome
    for text in dev.texts:
        if len(text_token_range(lm, text, proxy.suffix)[0]) <= args.max_tokens:
            chosen.append(text)
        if len(chosen) == args.n:
            break
    start = time.perf_counter()
    out = Path(args.out or "out/bench_sentiment_trace.json")
    traces = []
    for done, text in enumerate(chosen, start=1):  # the partial average is written after every text
        traces.append(trace_sentiment(lm, text, proxy, samples=args.samples, max_tokens=args.max_tokens))
        try:
            average = average_traces(traces)
        except UserError:  # no text so far moved the proxy enough
            continue
        result = {
            "texts": chosen[:done],
            "samples": args.samples,
            "max_tokens": args.max_tokens,
            "seconds": time.perf_counter() - start,
            **average.as_dict(),
            "per_text": [
                {
                    "text": t.text,
                    "tokens": t.tokens,
                    **score_json(t.clean_score, t.corrupted_score),
                    "seconds": t.seconds,
                    "peaks": {k: t.peak(k) for k in t.scores},
                }
                for t in traces
            ],
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(to_jsonable(result), indent=1) + "\n", encoding="utf-8")
        print(f"  traced {done}/{len(chosen)} texts, {time.perf_counter() - start:.0f} s", flush=True)
    print(
        f"average over {average.n} tweets ({average.skipped} skipped: corrupting moved the proxy < 0.05), "
        f"{result['seconds']:.0f} s"
    )
    for kind in average.effects:
        layer, category, effect = average.peak(kind)
        print(f"  {kind}: peak at layer {layer}, {category} (mean signed effect {effect:.3f})")
        table = average.effects[kind]
        for row, name in enumerate(average.as_dict()["categories"]):
            print(f"    {name:24s} " + " ".join(f"{v:6.3f}" for v in table[row]))
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("accuracy", "throughput", "trace"))
    parser.add_argument("--n", type=int, default=None)
    parser.add_argument("--max-tokens", type=int, default=14)
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"the tweets are not at {DATA}")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.n = args.n or {"accuracy": 0, "throughput": 128, "trace": 20}[args.mode]
    lm = load_model(device="cpu")
    result = {"accuracy": accuracy, "throughput": throughput, "trace": trace_average}[args.mode](lm, args)
    out = Path(args.out or f"out/bench_sentiment_{args.mode}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(to_jsonable(result), indent=1) + "\n", encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
