"""`python -m core edit-many`: many CounterFact edits on one model (sequential ROME / AlphaEdit, or one MEMIT
batch), scored over all edits after every k of them; optionally save the edited model, and keep a long run in
a checkpoint folder that a stopped run resumes from."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from tqdm import tqdm

from core.alphaedit import AlphaEditParams
from core.commands.common import add_value_precision_option, load, non_negative_float, positive_int
from core.commands.progress import progress_bar
from core.counterfact import PROJECT_FILE, load_counterfact
from core.edits import export_edits
from core.errors import UserError
from core.jsonfile import read_json
from core.many import METHODS, SEQUENTIAL, CurvePoint, ManyParams, cases_from_requests, default_rome, edit_many
from core.memit import VALUE_SETTINGS, MemitParams
from core.requests import read_requests
from core.saving import check_save_folder, save_edited_model


def register(parser: argparse.ArgumentParser, add_common_options) -> None:
    parser.add_argument(
        "--data",
        default=str(PROJECT_FILE),
        help="CounterFact-format JSON, or a CSV/JSON table of requests (prompt, subject, target_new[, target_true])",
    )
    parser.add_argument("--method", choices=METHODS, default="rome", help="memit: one batch; the others sequential")
    parser.add_argument("--limit", type=positive_int, default=None, help="only the first N cases")
    parser.add_argument("--layer", type=int, default=None, help="edit layer of rome/alphaedit (default: the model's)")
    parser.add_argument("--curve-every", type=positive_int, default=10, help="a curve point after every N edits")
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        help="memit: batches of N facts, each computed on the model carrying the earlier ones (default: one batch)",
    )
    parser.add_argument(
        "--time-budget",
        type=float,
        default=None,
        metavar="SECONDS",
        help="start no edit after this many seconds; measure the cases seen so far (default: no limit)",
    )
    parser.add_argument(
        "--fluency-tokens", type=int, default=40, help="tokens sampled per generation prompt (0: no fluency)"
    )
    parser.add_argument(
        "--null-space",
        action="store_true",
        help="memit: AlphaEdit's null-space projected solve, keeping earlier batches' keys (with --batch-size)",
    )
    parser.add_argument("--null-threshold", type=float, default=AlphaEditParams.null_threshold, help="alphaedit")
    parser.add_argument("--l2", type=float, default=AlphaEditParams.l2, help="alphaedit: weight of ||Delta P||^2")
    parser.add_argument(
        "--value-stop",
        type=non_negative_float,
        default=None,
        metavar="NLL",
        help="stop each fact's value optimisation once its target's NLL is below this "
        f"(default: memit {VALUE_SETTINGS.early_stop_loss:g}; rome and alphaedit run all steps)",
    )
    parser.add_argument(
        "--checkpoint",
        metavar="DIR",
        help="keep the run in DIR after every curve point; the same command given DIR again goes on from there",
    )
    add_value_precision_option(parser)
    parser.add_argument("--save", metavar="DIR", help="save the edited model as a Hugging Face folder")
    parser.add_argument("--export", metavar="FILE", help="write the edits (safetensors + JSON metadata)")
    add_common_options(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> dict:
    if args.save:
        check_save_folder(args.save)
    path = Path(args.data)
    records = None if path.suffix.lower() == ".csv" else read_json(path, "data file")
    if isinstance(records, list) and records and all(isinstance(r, dict) and "requested_rewrite" in r for r in records):
        cases, requests = load_counterfact(path, args.limit), None
    else:  # a table of plain requests
        if not path.is_file():
            raise UserError(f"data file {str(path)!r} does not exist")
        requests = read_requests(path.read_bytes(), path.name)[: args.limit]
    lm = load(args)
    if requests is not None:
        cases = cases_from_requests(lm, requests)
    if args.null_space and args.method != "memit":
        raise UserError("--null-space is MEMIT's AlphaEdit solve: use it with --method memit")
    alphaedit = AlphaEditParams(null_threshold=args.null_threshold, l2=args.l2)
    rome = replace(default_rome(args.method), value_precision=args.value_precision)
    if args.value_stop is not None:
        rome = replace(rome, early_stop="nll", early_stop_loss=args.value_stop)
    if args.method in SEQUENTIAL:  # --layer is ROME's and AlphaEdit's; MEMIT edits its own layers
        rome = replace(rome, layer=args.layer)
    params = ManyParams(
        method=args.method,
        rome=rome,
        alphaedit=alphaedit,
        memit=MemitParams(null_space=alphaedit if args.null_space else None),
        curve_every=args.curve_every,
        batch_size=args.batch_size,
        fluency_tokens=max(0, args.fluency_tokens),
        time_budget=args.time_budget,
    )
    params.rome.check(lm)
    header = f"{'edits':>6} {'ES':>6} {'PS':>6} {'NS':>6} {'GE':>6} {'fluency':>8} {'norm':>8} {'s':>6}"
    print(header, flush=True)

    def show(p: CurvePoint) -> None:
        flu = "-" if p.fluency is None else f"{p.fluency:.3f}"
        gen = "-" if p.generation_efficacy is None else f"{p.generation_efficacy:.3f}"
        tqdm.write(  # on a line of its own, under the progress bar
            f"{p.edits:>6} {p.efficacy:>6.3f} {p.paraphrase:>6.3f} {p.neighborhood:>6.3f} {gen:>6} {flu:>8} "
            f"{p.update_norm:>8.2f} {p.seconds:>6.0f}",
            file=sys.stdout,
        )
        sys.stdout.flush()

    with progress_bar(f"edit-many {args.method}") as progress:
        result, edits = edit_many(lm, cases, params, progress=progress, on_point=show, checkpoint=args.checkpoint)
    if args.export:
        export_edits(edits, args.export)
    if args.save:
        save_edited_model(lm, edits, args.save)
    flu = "-" if result.fluency is None else f"{result.fluency:.3f} (unedited {result.fluency_unedited:.3f})"
    print(
        f"{args.method}: n={result.n} (skipped {result.skipped}; {result.cases} of {len(cases)} cases seen)"
        f"  ES {result.efficacy:.3f}  PS {result.paraphrase:.3f}"
        f"  NS {result.neighborhood:.3f}  GE {result.generation_efficacy}  fluency {flu}  ({result.seconds:.0f} s)"
    )
    if args.save:
        print(f"edited model saved to {args.save}")
    return {
        **result.to_json(),
        "model": lm.name,
        "data": args.data,
        "batch_size": args.batch_size,
        "null_space": args.null_space,
        "saved": args.save,
        "exported": args.export,
    }
