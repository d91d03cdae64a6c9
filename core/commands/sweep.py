"""`python -m core sweep`: the same ROME edit at each of several layers, measured alike, beside the causal
trace's MLP effect at the subject's last token; one request (--prompt/--subject/--target) or a CounterFact set
(--data, averaged layer by layer), with the correlation between effect and edit success by layer."""

from __future__ import annotations

import argparse

from core.commands.common import load, positive_int
from core.commands.progress import progress_bar
from core.counterfact import load_counterfact
from core.covariance import DEFAULT_TOKENS
from core.edits import EditRequest
from core.errors import UserError
from core.evaluation import held_out
from core.rome import RomeHyperParams
from core.sweep import MEASURES, LayerSweep, average_sweeps, layer_sweep, parse_layers


def register(parser: argparse.ArgumentParser, add_common_options) -> None:
    parser.add_argument("--prompt", help='prompt with {} for the subject, e.g. "{} is located in"')
    parser.add_argument("--subject")
    parser.add_argument("--target", help="the new object")
    parser.add_argument("--data", help="a CounterFact-format file instead: every case swept, then averaged")
    parser.add_argument("--every", type=positive_int, default=1, help="with --data: every K-th case")
    parser.add_argument("--limit", type=positive_int, default=None, help="with --data: at most N cases (after --every)")
    parser.add_argument("--layers", default=None, help="e.g. 0-29:3 or 2,5,9 (default: every layer)")
    parser.add_argument("--paraphrase", nargs="*", default=[], metavar="PROMPT", help="prompts that should change")
    parser.add_argument("--neighbor", nargs="*", default=[], metavar="PROMPT", help="prompts that should not")
    parser.add_argument("--trace-samples", type=positive_int, default=10, help="noisy copies for the trace column")
    parser.add_argument("--no-trace", action="store_true", help="skip the causal-trace column")
    parser.add_argument(
        "--stats-tokens", type=positive_int, default=DEFAULT_TOKENS, help="corpus tokens for each layer's statistics"
    )
    add_common_options(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> dict:
    one = (args.prompt, args.subject, args.target)
    if args.data is None and not all(one):
        raise UserError("give --prompt, --subject and --target (one request) or --data FILE (a set)")
    if args.data is not None and any(one):
        raise UserError("--data sweeps a set: leave out --prompt, --subject and --target")
    cases = load_counterfact(args.data)[:: args.every][: args.limit] if args.data else []
    lm = load(args)
    layers = parse_layers(args.layers, lm.num_layers)
    if not cases:
        with progress_bar("layers") as bar:
            sweep = sweep_one(lm, EditRequest(*one), layers, args, args.paraphrase, args.neighbor, bar)
        r = sweep.request
        print(f"{r.text!r}: {r.target_true!r} -> {r.target_new!r}, p(new) before {sweep.before['p_new']:.4f}")
        print_table(sweep.rows, sweep.correlation())
        print(f"  best layer by score: {sweep.best_layer()}  ({sweep.seconds:.0f} s)")
        return {"model": lm.name, **sweep.to_json()}
    sweeps = []
    held = held_out(RomeHyperParams(stats_tokens=args.stats_tokens), cases)  # never preserve a measured subject
    with progress_bar("facts") as bar:
        bar(0, len(cases))
        for done, case in enumerate(cases, start=1):
            request = EditRequest(case.prompt, case.subject, case.target_new, case.target_true)
            paraphrases, neighbors = list(case.paraphrase_prompts), list(case.neighborhood_prompts)
            sweeps.append(sweep_one(lm, request, layers, args, paraphrases, neighbors, None, held))
            bar(done, len(cases))
    mean = average_sweeps(sweeps)
    print(f"{mean.n} facts averaged")
    print_table(mean.to_json()["rows"], mean.correlation())
    return {"model": lm.name, **mean.to_json()}


def sweep_one(
    lm, request: EditRequest, layers, args, paraphrases, neighbors, progress, hparams: RomeHyperParams | None = None
) -> LayerSweep:
    return layer_sweep(
        lm,
        request,
        layers,
        paraphrases=paraphrases,
        neighbors=neighbors,
        hparams=hparams or RomeHyperParams(stats_tokens=args.stats_tokens),
        trace_samples=None if args.no_trace else args.trace_samples,
        progress=progress,
    )


def print_table(rows: list[dict], correlations: dict) -> None:
    print(
        f"  {'layer':>5s} {'p(new)':>7s} {'eff':>5s} {'para':>5s} {'gen':>5s} {'neigh':>5s} {'score':>5s} {'trace':>6s}"
    )
    for row in rows:
        effect = row["trace_effect"]
        shown = "" if effect is None or effect != effect else f"{effect:+.3f}"
        print(
            f"  {row['layer']:5d} {row['p_new']:7.4f} {row['efficacy']:5.2f} {row['paraphrase']:5.2f} "
            f"{row['generation_efficacy']:5.2f} {row['neighborhood']:5.2f} {row['score']:5.2f} {shown:>6s}"
        )
    shown = ", ".join(f"{m} {r:+.2f}" if r is not None else f"{m} -" for m, r in correlations.items() if m in MEASURES)
    print(f"  correlation of the trace effect with: {shown}")
