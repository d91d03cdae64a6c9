"""`python -m core sentiment evaluate|trace`: the "I am feeling" proxy / probe on labelled texts, and the
sentiment trace of one text."""

from __future__ import annotations

import argparse
import time

from core.commands.common import load, non_negative_int, positive_int
from core.commands.progress import progress_bar
from core.errors import UserError


def _words(text: str) -> tuple[str, str]:
    parts = text.split(",")
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"{text!r}: give two words separated by a comma, e.g. ' good,' bad'")
    return parts[0], parts[1]


def register(subparsers, add_common_options) -> None:
    parser = subparsers.add_parser("sentiment", help="sentiment: the 'I am feeling' proxy, a probe, the trace")
    sub = parser.add_subparsers(dest="sentiment_command", required=True, parser_class=type(parser))

    ev = sub.add_parser("evaluate", help="fit the proxy or probe on --train, report accuracy on --test")
    ev.add_argument("--train", required=True, help="TSV/CSV with text,label (negative/neutral/positive or 0/1)")
    ev.add_argument("--test", required=True, help="TSV/CSV with text,label")
    ev.add_argument("--proxy", choices=("feeling", "probe"), default="feeling")
    ev.add_argument(
        "--layer", type=int, default=None, help="probe layer (default: sweep all, best by cross-validation on --train)"
    )
    ev.add_argument("--words", type=_words, default=None, help="positive,negative word pair (default ' good,' bad')")
    ev.add_argument("--no-cache", action="store_true", help="do not keep/reuse what the model read in the user cache")
    add_common_options(ev)
    ev.set_defaults(run=run_evaluate)

    tr = sub.add_parser("trace", help="causal trace of the proxy's positive-class probability over one text")
    tr.add_argument("--text", required=True)
    tr.add_argument("--span", default=None, help="corrupt only this part of the text (default: the whole text)")
    tr.add_argument("--train", default=None, help="fit the proxy on this TSV/CSV (default: the project's own set)")
    tr.add_argument("--words", type=_words, default=None, help="positive,negative word pair (default ' good,' bad')")
    tr.add_argument("--kind", choices=("hidden", "mlp", "attn", "all"), default="all")
    tr.add_argument("--samples", type=positive_int, default=10)
    tr.add_argument("--window", type=positive_int, default=10)
    tr.add_argument(
        "--max-tokens",
        type=positive_int,
        default=None,
        help="refuse longer prompts (default 48 for the exact engines, whose cost grows with the square of the "
        "length; the estimate is limited only by the model's context and memory)",
    )
    tr.add_argument("--engine", choices=("fast", "naive", "estimate"), default="fast")
    tr.add_argument(
        "--verify",
        type=non_negative_int,
        default=0,
        help="estimate engine: compute this many of its strongest cells per kind exactly",
    )
    add_common_options(tr)
    tr.set_defaults(run=run_trace)


def run_evaluate(args: argparse.Namespace) -> dict:
    from core.sentiment import DEFAULT_WORDS, evaluate, load_labelled

    train = load_labelled(args.train)
    test = load_labelled(args.test)
    lm = load(args)
    with progress_bar("reading texts") as bar:
        report = evaluate(
            lm,
            train,
            test,
            proxy=args.proxy,
            layer=args.layer,
            words=args.words or DEFAULT_WORDS,
            cache=not args.no_cache,
            progress=bar,
        )
    result = {"model": lm.name, "train": args.train, "test": args.test, **report.as_dict()}
    (tn, fp), (fn, tp) = report.confusion
    speed = f"{report.texts_per_second:.1f} texts/s" if report.texts_per_second else "features from the cache"
    where = f" at layer {report.layer}" if report.layer is not None else ""
    print(
        f"{args.proxy}{where}: accuracy {report.accuracy:.3f} on {report.n} texts {report.counts}; "
        f"confusion [[tn {tn}, fp {fp}], [fn {fn}, tp {tp}]]; {report.seconds:.1f} s, {speed}"
    )
    return result


def run_trace(args: argparse.Namespace) -> dict:
    from core.commands.trace import run_engine
    from core.sentiment import DEFAULT_WORDS
    from core.sentiment_trace import as_sentiment_trace, default_proxy, sentiment_setup

    if not args.text.strip():
        raise UserError("the text is empty")
    lm = load(args)
    with progress_bar("fitting the proxy") as fitting:
        proxy = default_proxy(lm, args.train, words=args.words or DEFAULT_WORDS, progress=fitting)
    kinds = ("hidden", "mlp", "attn") if args.kind == "all" else (args.kind,)
    if args.verify and args.engine != "estimate":
        raise UserError("--verify goes with --engine estimate")
    started = time.perf_counter()
    setup, text_range = sentiment_setup(
        lm,
        args.text,
        proxy,
        span=args.span,
        samples=args.samples,
        window=args.window,
        engine=args.engine,
        max_tokens=args.max_tokens,
    )
    traced = run_engine(setup, args, kinds, started)
    result = as_sentiment_trace(traced, args.text, text_range, proxy)
    for kind in kinds:
        layer, token = result.peak(kind)
        print(
            f"{kind}: strongest restoration at layer {layer}, token {result.tokens[token]!r} "
            f"(p(positive) {result.scores[kind][token, layer]:.3f})"
        )
    print(
        f"clean p(positive) {result.clean_score:.3f}, corrupted {result.corrupted_score:.3f}, {result.seconds:.1f} s "
        f"({args.engine})"
    )
    return {"model": lm.name, **result.as_dict()}
