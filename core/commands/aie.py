"""`python -m core aie`: average indirect effect over a facts file."""

from __future__ import annotations

import argparse

from core.aie import average_indirect_effect
from core.commands.common import load, non_negative_float, positive_int
from core.commands.progress import progress_bar
from core.facts import load_facts
from core.tracing import DEFAULT_SAMPLES, DEFAULT_WINDOW, KINDS


def register(parser: argparse.ArgumentParser, add_common_options) -> None:
    parser.add_argument("--facts", required=True, help="JSON list of {subject, prompt, attribute}")
    parser.add_argument("--limit", type=positive_int, default=None, help="trace at most N known facts")
    parser.add_argument("--samples", type=positive_int, default=DEFAULT_SAMPLES)
    parser.add_argument("--window", type=positive_int, default=DEFAULT_WINDOW)
    parser.add_argument("--noise", type=non_negative_float, default=None)
    add_common_options(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> dict:
    facts = load_facts(args.facts)
    lm = load(args)
    with progress_bar("facts traced") as progress:
        result = average_indirect_effect(
            lm, facts, limit=args.limit, samples=args.samples, noise=args.noise, window=args.window, progress=progress
        )
    print(f"{lm.name}: {result.n} facts traced, {result.skipped} skipped (not predicted), {result.seconds:.1f} s")
    if result.n:
        for kind in KINDS:
            category, layer, effect = result.peak(kind)
            print(f"  {kind:6s} peak AIE {effect:.4f} at {category}, layer {layer}")
    return result.to_json()
