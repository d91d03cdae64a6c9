"""`python -m core evaluate`: CounterFact metrics for none / rome / memit / ft: the teacher-forced ES, PS, NS,
score, fluency, and what the model writes (generation efficacy and rewrite, bleed, keeps-true over greedy
continuations; the texts are in the JSON per case)."""

from __future__ import annotations

import argparse

from tqdm import tqdm

from core.commands.common import add_rome_options, load, positive_int, rome_settings
from core.counterfact import PROJECT_FILE, load_counterfact
from core.covariance import CORPORA, DEFAULT_CORPUS, DEFAULT_TOKENS
from core.edit_site import KEY_TOKENS
from core.evaluation import METHODS, TEXT_TOKENS, FTHyperParams, evaluate
from core.rome import RomeHyperParams


def register(parser: argparse.ArgumentParser, add_common_options) -> None:
    parser.add_argument(
        "--data", default=str(PROJECT_FILE), help='CounterFact-format JSON file, or "counterfact" for the public file'
    )
    parser.add_argument("--method", choices=METHODS, default="rome")
    parser.add_argument("--limit", type=positive_int, default=None, help="only the first N cases")
    parser.add_argument(
        "--layer", type=int, default=None, help="edit layer of rome / ft (default: the model's; memit: its layers)"
    )
    parser.add_argument("--key-token", choices=KEY_TOKENS, default=RomeHyperParams.key_token)
    parser.add_argument("--corpus", choices=CORPORA, default=DEFAULT_CORPUS, help="covariance statistics corpus")
    parser.add_argument("--stats-tokens", type=positive_int, default=DEFAULT_TOKENS)
    parser.add_argument(
        "--fluency-tokens", type=int, default=40, help="tokens generated per generation prompt (0: no fluency)"
    )
    parser.add_argument(
        "--text-tokens",
        type=int,
        default=TEXT_TOKENS,
        help="new tokens of the greedy continuations read by the text-level scores (0: no text scores)",
    )
    add_rome_options(parser)
    add_common_options(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> dict:
    cases = load_counterfact(args.data, args.limit)
    lm = load(args)
    rome = rome_settings(args, lm)
    ft = FTHyperParams(layer=args.layer)
    with tqdm(total=len(cases), desc=f"evaluate {args.method}", unit="case", leave=False) as bar:

        def progress(done: int, total: int) -> None:
            bar.n = done
            bar.refresh()

        result = evaluate(
            lm,
            cases,
            args.method,
            rome=rome,
            ft=ft,
            fluency_tokens=max(0, args.fluency_tokens),
            progress=progress,
            text_tokens=max(0, args.text_tokens),
        )

    def shown(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    print(
        f"{args.method}: n={result.n} (skipped {result.skipped})  ES {result.efficacy:.3f}  "
        f"PS {result.paraphrase:.3f}  NS {result.neighborhood:.3f}  S {result.score:.3f}  "
        f"generation efficacy {shown(result.generation_efficacy)} (where the unedited text names the fact: "
        f"{shown(result.generation_rewrite)})  bleed {shown(result.generation_bleed)}  "
        f"fluency {shown(result.fluency)}  essence drift {shown(result.essence_drift)} nats  ({result.seconds:.0f} s)"
    )
    out = result.to_json()
    out.update(
        {"model": lm.name, "data": args.data, "layer": args.layer, "key_token": args.key_token, "corpus": args.corpus}
    )
    return out
