"""`python -m core trace`: causal trace of one prompt."""

from __future__ import annotations

import argparse
import sys

import numpy as np

from core.budget import check_trace
from core.commands.common import load, non_negative_float, positive_int
from core.commands.progress import progress_bar
from core.prompts import tokenize
from core.tracing import DEFAULT_SAMPLES, DEFAULT_WINDOW, KINDS, trace


def register(sub, add_common_options) -> None:
    parser = sub.add_parser("trace", help="causal trace of a prompt (hidden / mlp / attn)")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--subject", required=True)
    parser.add_argument("--kind", choices=[*KINDS, "all"], default="all")
    parser.add_argument("--samples", type=positive_int, default=DEFAULT_SAMPLES)
    parser.add_argument("--window", type=positive_int, default=DEFAULT_WINDOW)
    parser.add_argument(
        "--noise", type=non_negative_float, default=None, help="absolute noise scale (default 3 x embedding std)"
    )
    parser.add_argument("--engine", choices=["fast", "naive"], default="fast")
    add_common_options(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> dict:
    lm = load(args)
    kinds = list(KINDS) if args.kind == "all" else [args.kind]
    prompt = tokenize(lm.tokenizer, args.prompt, args.subject)
    cost = check_trace(lm, len(prompt.input_ids), prompt.subject_range[0], args.samples, len(kinds))
    print(f"estimated cost: {cost.describe()}", file=sys.stderr)
    with progress_bar(f"tracing ({args.engine})") as progress:
        result = trace(
            lm,
            args.prompt,
            args.subject,
            kinds=kinds,
            samples=args.samples,
            noise=args.noise,
            window=args.window,
            engine=args.engine,
            progress=progress,
        )
    start, end = result.subject_range
    print(
        f"{lm.name}: {args.prompt!r} -> {result.answer!r}  high {result.high_score:.4f}  low {result.low_score:.4f}  "
        f"subject tokens {start}..{end - 1}  {result.seconds:.1f} s ({args.engine})"
    )
    for kind in kinds:
        effect = result.indirect_effect(kind)
        token, layer = np.unravel_index(np.argmax(effect), effect.shape)
        print(
            f"  {kind:6s} peak {result.scores[kind][token, layer]:.4f} "
            f"at token {token} {result.tokens[token]!r}, layer {layer}"
        )
    return result.to_json()
