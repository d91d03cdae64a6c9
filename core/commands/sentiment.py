"""`python -m core sentiment evaluate|trace|edit`: the "I am feeling" proxy / probe on labelled texts, the
sentiment trace of one text, and the sentiment edit of a subject measured layer by layer."""

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


def register(parser: argparse.ArgumentParser, add_common_options) -> None:
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

    ed = sub.add_parser("edit", help="a rank-one edit of how a subject's texts read, measured layer by layer")
    ed.add_argument("--subject", required=True, help='e.g. "Monday": texts that mention it (whole word, any case)')
    ed.add_argument("--texts", required=True, help="TSV/CSV with a text column (and labels): the texts to split")
    ed.add_argument("--target", choices=("positive", "negative"), default="positive")
    ed.add_argument("--layers", default=None, help="e.g. 3, 0-29:3 or 2,5,9 (default: the fact-editing layer)")
    ed.add_argument("--held-in", type=positive_int, default=10, help="texts that mention the subject: the edit's")
    ed.add_argument("--held-out", type=positive_int, default=30, help="further texts that mention it: measured only")
    ed.add_argument("--others", type=positive_int, default=60, help="texts that do not mention it: measured only")
    ed.add_argument("--train", default=None, help="fit the proxy on this TSV/CSV (default: the project's own set)")
    ed.add_argument("--trace-texts", type=non_negative_int, default=5, help="held-in texts traced (0: no trace)")
    ed.add_argument("--trace-samples", type=positive_int, default=10)
    ed.add_argument("--steps", type=positive_int, default=20, help="value optimisation steps")
    ed.add_argument("--stats-tokens", type=positive_int, default=None, help="corpus tokens for each layer's statistics")
    add_common_options(ed)
    ed.set_defaults(run=run_edit)


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


def run_edit(args: argparse.Namespace) -> dict:
    from dataclasses import replace

    from core.edit_site import default_layer
    from core.rome import RomeHyperParams
    from core.sentiment import load_labelled
    from core.sentiment_edit import sentiment_edit_sweep, split_by_mention
    from core.sentiment_trace import default_proxy
    from core.sweep import parse_layers

    texts = load_labelled(args.texts).texts
    about, others = split_by_mention(texts, args.subject)
    if len(about) <= args.held_in:
        raise UserError(
            f"{args.texts} has {len(about)} texts that mention {args.subject.strip()!r}: "
            f"more than --held-in {args.held_in} are needed (the rest are held out)"
        )
    held_in, held_out = about[: args.held_in], about[args.held_in : args.held_in + args.held_out]
    lm = load(args)
    layers = parse_layers(args.layers, lm.num_layers) if args.layers else [default_layer(lm)]
    hp = RomeHyperParams(steps=args.steps)
    if args.stats_tokens:
        hp = replace(hp, stats_tokens=args.stats_tokens)
    with progress_bar("fitting the proxy") as fitting:
        proxy = default_proxy(lm, args.train, progress=fitting)
    with progress_bar("layers") as bar:
        sweep = sentiment_edit_sweep(
            lm,
            args.subject,
            proxy,
            held_in,
            held_out,
            others[: args.others],
            layers,
            args.target,
            hp,
            trace_texts=args.trace_texts or None,
            trace_samples=args.trace_samples,
            progress=bar,
        )
    data = sweep.to_json()
    print(
        f"{args.subject.strip()!r} -> read as {args.target}: {len(held_in)} held-in, {len(held_out)} held-out "
        f"texts that mention it, {len(others[: args.others])} that do not"
    )
    print(
        f"  {'layer':>5s} {'flip in':>7s} {'flip out':>8s} {'others kept':>11s} {'p out before>after':>18s} {'mlp':>6s}"
    )
    for row in data["rows"]:
        shares = [row["flipped_held_in"], row["flipped_held_out"], row["unchanged_others"]]
        a, b, c = ("-" if v is None else f"{v:.2f}" for v in shares)
        effect = "" if row["mlp_effect"] is None else f"{row['mlp_effect']:+.3f}"
        before, after = row["p_held_out"]
        print(f"  {row['layer']:5d} {a:>7s} {b:>8s} {c:>11s} {before:8.3f} > {after:7.3f} {effect:>6s}")
    for row in data["rows"]:
        if row["warning"]:
            print(f"  note, layer {row['layer']}: {row['warning']}")
    if data["correlation"]:
        shown = ", ".join(f"{k} {v:+.2f}" if v is not None else f"{k} -" for k, v in data["correlation"].items())
        print(f"  correlation of the MLP effect with: {shown}")
    return {"model": lm.name, **data}
