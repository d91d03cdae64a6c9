"""`python -m core trace`: causal trace of one prompt."""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from core.budget import check_trace
from core.commands.common import load, non_negative_float, non_negative_int, positive_int
from core.commands.progress import progress_bar
from core.errors import UserError
from core.trace_cost import estimated_seconds
from core.tracing import DEFAULT_SAMPLES, DEFAULT_WINDOW, ENGINES, KINDS, TraceResult, prepare, trace_setup


def register(parser: argparse.ArgumentParser, add_common_options) -> None:
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--subject", required=True)
    parser.add_argument("--kind", choices=[*KINDS, "all"], default="all")
    parser.add_argument("--samples", type=positive_int, default=DEFAULT_SAMPLES)
    parser.add_argument("--window", type=positive_int, default=DEFAULT_WINDOW)
    parser.add_argument(
        "--noise", type=non_negative_float, default=None, help="absolute noise scale (default 3 x embedding std)"
    )
    parser.add_argument(
        "--engine",
        choices=list(ENGINES),
        default="fast",
        help="fast / naive: exact; estimate: a first-order estimate of every cell in seconds (attribution patching)",
    )
    parser.add_argument(
        "--verify",
        type=non_negative_int,
        default=0,
        help="estimate engine: compute this many of its strongest cells per kind exactly (fast engine)",
    )
    add_common_options(parser)
    parser.set_defaults(run=run)


def forecast(setup, engine: str, kinds) -> None:
    """One line on stderr before an exact trace: about how long it will take here."""
    if ENGINES[engine].exact:
        seconds = estimated_seconds(setup, engine, tuple(kinds))
        print(
            f"{engine} trace of {setup.num_tokens} tokens, {len(kinds)} kind(s): about {seconds:.0f} s", file=sys.stderr
        )


def run_engine(setup, args: argparse.Namespace, kinds, started: float) -> TraceResult:
    """Trace `setup` with the command's engine (--engine, --verify, --samples): an exact engine's cap checked
    first (context, memory), the time forecast printed, a progress bar while it runs."""
    if args.engine != "estimate":  # the exact engines record every state: capped by context and memory
        check_trace(setup.lm, setup.num_tokens, samples=args.samples, kinds=len(kinds))
    forecast(setup, args.engine, kinds)
    with progress_bar(f"tracing ({args.engine})") as progress:
        return trace_setup(
            setup,
            kinds=kinds,
            engine_name=args.engine,
            engine_options={"verify": args.verify} if args.engine == "estimate" else None,
            progress=progress,
            started=started,
        )


def run(args: argparse.Namespace) -> dict:
    lm = load(args)
    kinds = list(KINDS) if args.kind == "all" else [args.kind]
    if args.verify and args.engine != "estimate":
        raise UserError("--verify goes with --engine estimate")
    started = time.perf_counter()
    setup = prepare(lm, args.prompt, args.subject, samples=args.samples, noise=args.noise, window=args.window)
    result = run_engine(setup, args, kinds, started)
    start, end = result.subject_range
    print(
        f"{lm.name}: {args.prompt!r} -> {result.answer!r}  clean {result.clean_score:.4f}  "
        f"corrupted {result.corrupted_score:.4f}  subject tokens {start}..{end - 1}  "
        f"{result.seconds:.1f} s ({args.engine})"
    )
    for kind in kinds:
        effect = result.indirect_effect(kind)
        token, layer = np.unravel_index(np.argmax(effect), effect.shape)
        print(
            f"  {kind:6s} peak {result.scores[kind][token, layer]:.4f} "
            f"at token {token} {result.tokens[token]!r}, layer {layer}"
        )
    return result.to_json()
