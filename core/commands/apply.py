"""`python -m core apply --edits FILE --save DIR`: exported edits on a model, saved as a Hugging Face folder."""

from __future__ import annotations

import argparse

from core.commands.common import load
from core.commands.progress import progress_bar
from core.edits import import_edits
from core.saving import check_save_folder, save_edited_model


def register(parser: argparse.ArgumentParser, add_common_options) -> None:
    parser.add_argument("--edits", required=True, metavar="FILE", help="edits written by `edit --export`")
    parser.add_argument("--save", required=True, metavar="DIR", help="new folder for the edited model")
    add_common_options(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> dict:
    check_save_folder(args.save)
    lm = load(args)
    edits = import_edits(args.edits, lm)
    with progress_bar("save") as progress:
        folder = save_edited_model(lm, edits, args.save, progress=progress)
    print(f"{len(edits)} edit(s) applied to {lm.name}, saved to {folder}")
    return {"model": lm.name, "edits": [e.record() for e in edits], "saved": str(folder)}
