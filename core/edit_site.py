"""Where ROME writes: the edit layer of a model and the subject token whose key is rewritten.

- `default_layer(lm)`: measured for the embedded model, the paper's for its models, else the same relative depth.
- `measure_layer(lm, facts)`: the layer of peak average MLP indirect effect at the last subject token (core.aie).
- `strongest_key_offset(lm, request, layer)`: the subject token where restoring the MLP outputs around the layer
  brings back most of the answer (one causal-trace cell per subject token), as an offset back from the last.

Kept apart from core/rome.py so that editing does not import tracing (and tracing never imports editing).
"""

from __future__ import annotations

from core.edits import EditRequest
from core.errors import UserError
from core.models import EMBEDDED_MODEL, LoadedModel
from core.progress import Progress

# Default edit layer of the embedded model: the layer of peak average MLP indirect effect at the last
# subject token over facts the model predicts, from its own causal traces (core.tracing.trace, kind mlp,
# 10 samples, window 10, noise 3 x embedding std). Measured on 14 hand-written facts (landmark -> city,
# country -> capital, landmark -> country; 2 of 16 skipped, not predicted). AIE by layer 0..7:
# .271 .283 .278 .307 .304 .299 .116 .110 -> peak at layer 3 (flat over 0-5 because the window of 10
# restores layers 0..l+4 together there). Re-measure on data/known_facts.json with
#   PYTHONPATH=. python bench/edit.py --measure-layer 20     (core.aie over that file; `measure_layer`)
EMBEDDED_LAYER = 3
# Layers the paper used for models it edited (GPT-2 XL 17, GPT-J 5); other models: see `default_layer`.
KNOWN_LAYERS = {EMBEDDED_MODEL: EMBEDDED_LAYER, "gpt2-xl": 17, "EleutherAI/gpt-j-6B": 5}
KEY_TOKENS = ("last", "strongest")


def default_layer(lm: LoadedModel) -> int:
    """The edit layer: measured for the embedded model (see EMBEDDED_LAYER), the paper's for its models,
    else the layer at the same relative depth as the embedded model's (a first guess; measure with
    bench/edit.py --measure-layer and pass --layer)."""
    if lm.name in KNOWN_LAYERS and KNOWN_LAYERS[lm.name] < lm.num_layers:
        return KNOWN_LAYERS[lm.name]
    return min(lm.num_layers - 1, round(EMBEDDED_LAYER / 30 * lm.num_layers))


def measure_layer(lm: LoadedModel, facts, limit: int = 20, progress: Progress | None = None) -> tuple[int, list[float]]:
    """The layer of peak average MLP indirect effect at the last subject token over `facts` the model
    knows (the paper's early site), and that AIE row; minutes per model, so run once and pass --layer."""
    from core.aie import CATEGORIES, average_indirect_effect

    result = average_indirect_effect(lm, facts, limit=limit, kinds=("mlp",), progress=progress)
    if result.n == 0:
        raise UserError("the model predicts none of the facts: no causal trace to choose a layer from")
    row = list(result.tables["mlp"][CATEGORIES.index("last subject token")])
    return int(max(range(len(row)), key=lambda i: row[i])), row


def strongest_key_offset(lm: LoadedModel, request: EditRequest, layer: int, window: int = 10) -> int:
    """Offset back from the subject's last token of the subject token where restoring the MLP outputs
    around `layer` (one causal-trace cell per subject token) brings back most of the answer."""
    from core.tracing import naive_scores, prepare, window_layers

    setup = prepare(lm, request.text, request.subject, window=window)
    start, end = setup.corrupt_range
    names = [lm.arch.layer_name(lm.model, m, "mlp") for m in window_layers(layer, window, lm.num_layers)]
    scores = [naive_scores(lm, setup, [(i, name) for name in names]) for i in range(start, end)]
    best = start + max(range(len(scores)), key=scores.__getitem__)
    return end - 1 - best


def key_offset(lm: LoadedModel, request: EditRequest, layer: int, key_token: str) -> int:
    """How many tokens before the subject's last token the key is read (0 for "last")."""
    if key_token not in KEY_TOKENS:
        raise UserError(f"unknown key token {key_token!r}: use one of {', '.join(KEY_TOKENS)}")
    return strongest_key_offset(lm, request, layer) if key_token == "strongest" else 0
