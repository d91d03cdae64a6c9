"""`python -m core edit`: make one ROME edit and show the model's answers and text before and after."""

from __future__ import annotations

import argparse
import sys

import numpy as np

from core.commands.common import add_rome_options, load, output_file, positive_int, rome_settings
from core.commands.progress import progress_bar
from core.covariance import CORPORA, DEFAULT_CORPUS, DEFAULT_TOKENS, statistics_cached, statistics_seconds
from core.edit_site import KEY_TOKENS, default_layer
from core.edits import EditRequest, applied, export_edits
from core.evaluation import edit_warning, names_object, next_token_log_probs, target_log_probs, top_next_tokens
from core.generation import MAX_NEW_TOKENS, GenerationSettings, generate
from core.rome import RomeHyperParams, compute_edit, validate_request
from core.saving import check_save_folder, save_edited_model


def register(parser: argparse.ArgumentParser, add_common_options) -> None:
    parser.add_argument(
        "--prompt", required=True, help='prompt with {} for the subject, e.g. "{} is located in the city of"'
    )
    parser.add_argument("--subject", required=True)
    parser.add_argument("--target", required=True, help="the new object, e.g. Rome")
    parser.add_argument("--layer", type=int, default=None, help="edit layer (default: the model's default)")
    parser.add_argument("--generate", nargs="+", default=[], metavar="TEXT", help="prompts to continue before/after")
    parser.add_argument(
        "--max-new-tokens", type=positive_int, default=30, help=f"per generation (at most {MAX_NEW_TOKENS})"
    )
    parser.add_argument("--sample", action="store_true", help="seeded sampling instead of greedy text")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--key-token", choices=KEY_TOKENS, default=RomeHyperParams.key_token)
    parser.add_argument("--corpus", choices=CORPORA, default=DEFAULT_CORPUS, help="covariance statistics corpus")
    parser.add_argument(
        "--stats-tokens", type=positive_int, default=DEFAULT_TOKENS, help="corpus tokens for the statistics"
    )
    parser.add_argument(
        "--export", metavar="FILE", type=output_file, help="also write the edit (safetensors + JSON metadata)"
    )
    parser.add_argument("--save", metavar="DIR", help="also save the edited model as a Hugging Face folder")
    add_rome_options(parser)
    add_common_options(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> dict:
    lm = load(args)
    request = EditRequest(args.prompt, args.subject, args.target)
    hp = rome_settings(args, lm)
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, sample=args.sample, seed=args.seed)
    settings.check()
    request = validate_request(lm, request)  # before any work: bad input never half-edits
    if args.save:
        check_save_folder(args.save)

    def probabilities() -> tuple[float, float, list[tuple[str, float]]]:  # p(new), p(true), likeliest next
        lp = target_log_probs(lm, [request.text] * 2, [request.target_new, request.target_true])
        return (
            float(np.exp(lp[0])),
            float(np.exp(lp[1])),
            top_next_tokens(lm, next_token_log_probs(lm, [request.text])[0]),
        )

    p_new_before, p_true_before, next_before = probabilities()
    before = generate(lm, args.generate, settings)
    layer = default_layer(lm) if hp.layer is None else hp.layer
    if not statistics_cached(lm, layer, hp.stats_corpus, hp.stats_tokens):
        seconds = statistics_seconds(lm, hp.stats_tokens)
        print(f"key statistics for layer {layer} are not cached: about {seconds / 60:.0f} min, once", file=sys.stderr)
    with progress_bar("edit") as progress:
        edit = compute_edit(lm, request, hp, progress=progress)
    with applied(lm, [edit]):
        p_new_after, p_true_after, next_after = probabilities()
        after = generate(lm, args.generate, settings)
    if args.export:
        export_edits([edit], args.export)
    if args.save:
        save_edited_model(lm, [edit], args.save)
        print(f"  edited model saved to {args.save}")
    info = edit.info
    print(f"{request.text!r}: {request.target_true!r} -> {request.target_new.strip()!r} at layer {edit.layer}")
    print(f"  p(new)  {p_new_before:.4f} -> {p_new_after:.4f}")
    print(f"  p(true) {p_true_before:.4f} -> {p_true_after:.4f}")
    for name, tokens in (("before", next_before), ("after", next_after)):
        print(f"  next {name + ':':<7} " + " · ".join(f"{t!r} {p:.3f}" for t, p in tokens))
    print(f"  edit {info['seconds']:.1f} s ({info['steps']} steps), statistics {info['stats_seconds']:.1f} s")
    names_new = [names_object(a[len(p) :], request.target_new) for p, a in zip(args.generate, after)]
    for b, a, named in zip(before, after, names_new):
        print(f"  before: {b!r}\n  after:  {a!r}  (names {request.target_new.strip()!r}: {'yes' if named else 'no'})")
    warning = edit_warning(request, p_new_after, p_true_after, names_new)
    if warning:
        print(f"  note: {warning}")
    return {
        "model": lm.name,
        "prompt": request.prompt,
        "subject": request.subject,
        "target_new": request.target_new,
        "target_true": request.target_true,
        "layer": edit.layer,
        "key_token": hp.key_token,
        "p_new_before": p_new_before,
        "p_true_before": p_true_before,
        "p_new_after": p_new_after,
        "p_true_after": p_true_after,
        "next_tokens_before": next_before,
        "next_tokens_after": next_after,
        "generate": args.generate,
        "generations_before": before,
        "generations_after": after,
        "generations_name_new": names_new,
        "seconds": info["seconds"],
        "stats_seconds": info["stats_seconds"],
        "steps": info["steps"],
        "losses": info["losses"],
        "edit_id": edit.id,
        "warning": warning,
        "exported": args.export,
        "saved": args.save,
    }
