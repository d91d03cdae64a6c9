"""Layer sweep: the same ROME edit made at each of several layers, measured the same way at each, beside the
causal trace's MLP effect at the subject's last token (does the layer where the fact is located say where
an edit works best? Hase et al. 2023 found it often does not).

Only the public API is used: `core.rome.compute_edit(lm, request, RomeHyperParams(layer=l))` and
`core.edits.applied`, so the sweep follows whatever the edit itself becomes.

    request = EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome")
    sweep = layer_sweep(lm, request, layers=range(0, 30, 3))
    sweep.rows[0]   # {"layer", "p_new", "p_true", "efficacy", "paraphrase", "generation_efficacy", "neighborhood",
                    #  "trace_effect", ...}
    sweep.correlation()  # Pearson r over layers between the trace effect and each measure

`average_sweeps` averages the sweeps of a set of facts layer by layer (the paper's comparison of causal effect
with edit success by layer), with the correlation of the averaged curves.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from core.edits import EditRequest, applied
from core.errors import UserError
from core.evaluation import TEXT_TOKENS, continuations, names_object, target_log_probs
from core.generation import GenerationSettings, generate
from core.models import LoadedModel
from core.progress import Progress, Step
from core.rome import RomeHyperParams, compute_edit, validate_request

MEASURES = ("p_new", "efficacy", "paraphrase", "generation_efficacy", "neighborhood", "score")


def correlation(effects: Sequence[float | None], values: Sequence[float]) -> float | None:
    """Pearson r over the layers where both are defined; None with fewer than 3 such layers or a constant."""
    pairs = [(e, v) for e, v in zip(effects, values) if e is not None and v is not None and not np.isnan([e, v]).any()]
    if len(pairs) < 3:
        return None
    x, y = np.array(pairs, dtype=float).T
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


@dataclass
class LayerSweep:
    request: EditRequest
    layers: list[int]
    rows: list[dict]  # one per layer
    paraphrases: list[str]
    neighbors: list[str]
    trace_effect: list[float | None]  # mlp indirect effect at the subject's last token, per swept layer
    seconds: float
    before: dict = field(default_factory=dict)  # p_new / p_true before any edit

    def best_layer(self, measure: str = "score") -> int:
        return self.rows[int(np.argmax([r[measure] for r in self.rows]))]["layer"]

    def correlation(self) -> dict[str, float | None]:
        """measure -> Pearson r over the swept layers between the trace's MLP effect and that measure."""
        return {m: correlation(self.trace_effect, [r[m] for r in self.rows]) for m in MEASURES}

    def to_json(self) -> dict:
        return {
            "request": asdict(self.request),
            "layers": self.layers,
            "paraphrases": self.paraphrases,
            "neighbors": self.neighbors,
            "before": self.before,
            "rows": self.rows,
            "trace_effect": self.trace_effect,
            "best_layer": self.best_layer(),
            "correlation": self.correlation(),
            "seconds": self.seconds,
        }


def parse_layers(text: str | None, num_layers: int) -> list[int]:
    """ "3", "0-29", "0-29:3" (every third), "2,5,9" -> sorted layers, checked against the model."""
    if not text:
        return list(range(num_layers))
    layers: set[int] = set()
    try:
        for part in text.split(","):
            part = part.strip()
            step = 1
            if ":" in part:
                part, step_text = part.split(":")
                step = int(step_text)
            if "-" in part:
                lo, hi = (int(v) for v in part.split("-"))
                layers.update(range(lo, hi + 1, max(1, step)))
            else:
                layers.add(int(part))
    except ValueError:
        raise UserError(f"layers {text!r}: use e.g. 5, 0-29, 0-29:3 or 2,5,9") from None
    bad = [layer for layer in layers if not 0 <= layer < num_layers]
    if bad or not layers:
        raise UserError(f"layers {text!r}: the model has layers 0..{num_layers - 1}")
    return sorted(layers)


def _answers(lm: LoadedModel, prompts: Sequence[str]) -> list[str]:
    if not prompts:
        return []
    return [
        t.strip().split(" ")[0] if t.strip() else ""
        for t in generate(lm, list(prompts), GenerationSettings(max_new_tokens=2))
    ]


def _trace_effects(lm: LoadedModel, request: EditRequest, layers: Sequence[int], samples: int) -> list[float]:
    """Exact mlp-kind indirect effect at the subject's last token for each layer (fast engine, those cells only)."""
    from core.fast_tracing import mlp_effects_at_span_end
    from core.trace_setup import prepare

    return mlp_effects_at_span_end(prepare(lm, request.text, request.subject, samples=samples), layers)


def layer_sweep(
    lm: LoadedModel,
    request: EditRequest,
    layers: Sequence[int],
    *,
    paraphrases: Sequence[str] = (),
    neighbors: Sequence[str] = (),
    hparams: RomeHyperParams | None = None,
    trace_samples: int | None = 10,
    progress: Progress | None = None,
    step: Step = nullcontext,
) -> LayerSweep:
    """Make `request` at each of `layers` (one at a time, never stacked) and measure, with the edit applied:
    p(new) / p(true) on the prompt, efficacy (p(new) > p(true)), paraphrase (share of `paraphrases` where
    p(new) > p(true)), generation efficacy (share of the prompt's and paraphrases' greedy continuations,
    TEXT_TOKENS new tokens, that name the new object), neighbourhood (share of `neighbors` whose first greedy
    word is unchanged) and their harmonic mean `score`; beside it the causal trace's mlp effect at that layer
    (`trace_samples` None: skip). Model work runs inside `step()` (the app: its session's edits under the lock,
    taken per layer), each layer's edit computed on the model as it is there."""
    started = time.perf_counter()
    with step():
        request = validate_request(lm, request)
    base = hparams or RomeHyperParams()
    paraphrases, neighbors = list(paraphrases), list(neighbors)
    prompts = [request.text, *paraphrases]

    def probabilities() -> tuple[np.ndarray, np.ndarray]:
        new = np.exp(target_log_probs(lm, prompts, [request.target_new] * len(prompts)))
        true = np.exp(target_log_probs(lm, prompts, [request.target_true] * len(prompts)))
        return new, true

    with step():
        new0, true0 = probabilities()
        neighbor_answers = _answers(lm, neighbors)
    rows = []
    for done, layer in enumerate(layers):
        edit = compute_edit(lm, request, replace(base, layer=layer), step=step)
        with step(), applied(lm, [edit]):
            new, true = probabilities()
            kept = _answers(lm, neighbors)
            texts = continuations(lm, prompts, TEXT_TOKENS)
        efficacy = float(new[0] > true[0])
        paraphrase = float(np.mean(new[1:] > true[1:])) if paraphrases else float("nan")
        neighborhood = float(np.mean([a == b for a, b in zip(kept, neighbor_answers)])) if neighbors else float("nan")
        parts = [v for v in (efficacy, paraphrase, neighborhood) if not np.isnan(v)]
        score = len(parts) / sum(1 / v for v in parts) if parts and min(parts) > 0 else 0.0
        rows.append(
            {
                "layer": layer,
                "p_new": float(new[0]),
                "p_true": float(true[0]),
                "efficacy": efficacy,
                "paraphrase": paraphrase,
                "generation_efficacy": float(np.mean([names_object(t, request.target_new) for t in texts])),
                "neighborhood": neighborhood,
                "score": score,
                "edit_seconds": edit.info.get("seconds"),
                "texts": texts,
            }
        )
        if progress:
            progress(done + 1, len(layers))
    with step():
        effects = _trace_effects(lm, request, layers, trace_samples) if trace_samples else [None] * len(layers)
    for row, effect in zip(rows, effects):
        row["trace_effect"] = effect
    return LayerSweep(
        request,
        list(layers),
        rows,
        paraphrases,
        neighbors,
        effects,
        time.perf_counter() - started,
        {"p_new": float(new0[0]), "p_true": float(true0[0])},
    )


@dataclass
class AverageSweep:
    """Sweeps of several facts averaged layer by layer (the same layers each)."""

    layers: list[int]
    means: dict[str, list[float]]  # measure (and "trace_effect") -> mean per layer
    n: int
    sweeps: list[LayerSweep]

    def correlation(self) -> dict[str, float | None]:
        return {m: correlation(self.means["trace_effect"], self.means[m]) for m in MEASURES}

    def to_json(self) -> dict:
        return {
            "n": self.n,
            "layers": self.layers,
            "rows": [
                {"layer": layer, **{m: values[i] for m, values in self.means.items()}}
                for i, layer in enumerate(self.layers)
            ],
            "correlation": self.correlation(),
            "facts": [s.to_json() for s in self.sweeps],
        }


def average_sweeps(sweeps: Sequence[LayerSweep]) -> AverageSweep:
    """Mean of each measure and of the trace effect per layer over `sweeps` (NaN / None left out)."""
    if not sweeps:
        raise UserError("no sweep to average")
    layers = sweeps[0].layers
    if any(s.layers != layers for s in sweeps):
        raise UserError("the sweeps cover different layers")
    means = {}
    for measure in (*MEASURES, "trace_effect"):
        table = np.array([[np.nan if r[measure] is None else r[measure] for r in s.rows] for s in sweeps], dtype=float)
        with np.errstate(all="ignore"):
            column = [float(np.nanmean(col)) if not np.isnan(col).all() else float("nan") for col in table.T]
        means[measure] = column
    return AverageSweep(list(layers), means, len(sweeps), list(sweeps))
