"""`python -m core sweep`: the same ROME edit at each of several layers, measured alike, beside the causal
trace's MLP effect at the subject's last token."""

from __future__ import annotations

import argparse

from core.commands.common import load, positive_int
from core.commands.progress import progress_bar
from core.edits import EditRequest
from core.rome import RomeHyperParams
from core.sweep import layer_sweep, parse_layers


def register(sub, add_common_options) -> None:
    parser = sub.add_parser("sweep", help="layer sweep: the same ROME edit at each layer, with the trace beside it")
    parser.add_argument("--prompt", required=True, help='prompt with {} for the subject, e.g. "{} is located in"')
    parser.add_argument("--subject", required=True)
    parser.add_argument("--target", required=True, help="the new object")
    parser.add_argument("--layers", default=None, help="e.g. 0-29:3 or 2,5,9 (default: every layer)")
    parser.add_argument("--paraphrase", nargs="*", default=[], metavar="PROMPT", help="prompts that should change")
    parser.add_argument("--neighbor", nargs="*", default=[], metavar="PROMPT", help="prompts that should not")
    parser.add_argument("--trace-samples", type=positive_int, default=10, help="noisy copies for the trace column")
    parser.add_argument("--no-trace", action="store_true", help="skip the causal-trace column")
    add_common_options(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> dict:
    lm = load(args)
    layers = parse_layers(args.layers, lm.num_layers)
    with progress_bar("layers") as bar:
        sweep = layer_sweep(
            lm,
            EditRequest(args.prompt, args.subject, args.target),
            layers,
            paraphrases=args.paraphrase,
            neighbors=args.neighbor,
            hparams=RomeHyperParams(),
            trace_samples=None if args.no_trace else args.trace_samples,
            progress=bar,
        )
    r = sweep.request
    print(f"{r.text!r}: {r.target_true!r} -> {r.target_new!r}, p(new) before {sweep.before['p_new']:.4f}")
    print(
        f"  {'layer':>5s} {'p(new)':>7s} {'p(true)':>7s} {'eff':>4s} {'para':>5s} {'neigh':>5s} "
        f"{'score':>5s} {'trace':>6s}"
    )
    for row in sweep.rows:
        effect = "" if row["trace_effect"] is None else f"{row['trace_effect']:+.3f}"
        print(
            f"  {row['layer']:5d} {row['p_new']:7.4f} {row['p_true']:7.4f} {row['efficacy']:4.0f} "
            f"{row['paraphrase']:5.2f} {row['neighborhood']:5.2f} {row['score']:5.2f} {effect:>6s}"
        )
    print(f"  best layer by score: {sweep.best_layer()}  ({sweep.seconds:.0f} s)")
    return {"model": lm.name, **sweep.to_json()}
