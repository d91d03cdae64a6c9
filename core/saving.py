"""Save an edited model as a Hugging Face folder that plain transformers loads unchanged.

    save_edited_model(lm, edits, "out/edited")
    AutoModelForCausalLM.from_pretrained("out/edited")   # answers the edited facts; no ROME Studio needed

The folder holds the weights with the edits applied (safetensors), the config, the tokenizer and a README.md
listing every edit (subject, prompt, old and new object, layer, norm of the update). The shared model is put
back bitwise afterwards (core.edits.applied), so saving never changes what other sessions see.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from core.edits import Edit, applied
from core.errors import UserError
from core.models import LoadedModel
from core.progress import Progress

README = "README.md"


def edits_readme(lm: LoadedModel, edits: Sequence[Edit]) -> str:
    """The folder's README: what the model is and one table row per edit, in the order they were applied."""
    lines = [
        f"# {lm.name}, edited",
        "",
        f"Weights of `{lm.name}` ({lm.arch.family}) with {len(edits)} fact edit(s) applied by ROME Studio, in this "
        "order; each edit adds a rank-one matrix v u^T to one MLP output projection. Load it with "
        "`transformers.AutoModelForCausalLM.from_pretrained(folder)`.",
        "",
        "| # | id | layer | prompt | subject | old | new | method | norm of v u^T |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for i, edit in enumerate(edits, 1):
        r = edit.request
        norm = float(edit.v.float().norm() * edit.u.float().norm())
        method = edit.info.get("method", "rome")
        cells = [str(i), edit.id, str(edit.layer), r.prompt, r.subject, r.target_true or "", r.target_new, method]
        cells = [c.replace("|", "\\|") for c in cells]
        lines.append("| " + " | ".join(cells) + f" | {norm:.4g} |")
    return "\n".join(lines) + "\n"


def check_save_folder(folder: str | Path) -> Path:
    """The folder to save into, if it is free (absent or empty); else a UserError (check before long work)."""
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise UserError(f"{str(folder)!r} already exists and is not an empty folder: choose a new one")
    return folder


def save_edited_model(
    lm: LoadedModel,
    edits: Sequence[Edit],
    folder: str | Path,
    progress: Progress | None = None,
) -> Path:
    """Write `lm` with `edits` applied to `folder` (created; must be empty or absent): safetensors weights,
    config, generation config, tokenizer, README.md. Written next to the folder first, then renamed, so a
    folder is never half-written."""
    folder = check_save_folder(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.partial-"))
    tick = progress or (lambda done, total: None)
    try:
        tick(0, 3)
        with applied(lm, edits):
            lm.model.save_pretrained(tmp, safe_serialization=True)
        tick(1, 3)
        lm.tokenizer.save_pretrained(tmp)
        (tmp / README).write_text(edits_readme(lm, edits), encoding="utf-8")
        tick(2, 3)
        if folder.exists():
            folder.rmdir()
        tmp.rename(folder)
        tick(3, 3)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
