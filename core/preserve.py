"""Keys a ROME edit should leave alone: the subjects of a catalogue of known facts.

ROME's update direction u = C^-1 k* (C = E[k k^T] over running text) moves least the outputs of the keys the
corpus often holds. A subject's key (the MLP input at a name's last token) is rare in running text, so the
keys of *other* subjects, which resemble the edited one, move with it: the neighbourhood failures ("Lyon" is
moved along with "Paris"). With a preserve weight w > 0 the update is solved with

    C' = C + w * tr(C) / tr(E) * E,   E = mean over the catalogue's subjects of k_e k_e^T

(the edited subject itself left out), the constrained least squares of ROME's eq. 2 with the catalogue's keys
counted among the keys to keep. W' k* = v* still holds exactly; only the direction of u changes.

    keys = subject_keys(lm, layer)                           # cached per weights, layer and catalogue
    c = preserved_moment(stats.mom2, keys, "The Eiffel Tower", weight=1.0)

Keys are computed on the unedited weights (core.edits.unedited), so an edit a session holds never reaches them.
The catalogue is a known-facts file (core/facts.py; data/known_facts.json by default). An evaluation preserves
`catalogue_without` the subjects its own prompts mention, so it never protects the keys it then measures.
"""

from __future__ import annotations

import hashlib
import json
import weakref
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from core.atomic import write_atomically
from core.covariance import layer_keys, stats_folder
from core.edits import unedited
from core.facts import DEFAULT_FACTS, load_facts
from core.models import LoadedModel, cache_dir
from core.prompts import find_subject_chars
from core.tensor_cache import load_tensors, save_tensors


@dataclass(frozen=True)
class SubjectKeys:
    """One key per distinct subject of a catalogue, at one layer."""

    layer: int
    names: tuple[str, ...]
    keys: torch.Tensor  # (subjects, in_features) float32


_CACHE: "weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple, SubjectKeys]]" = weakref.WeakKeyDictionary()


def subject_prefixes(path: str | Path) -> dict[str, str]:
    """Each distinct subject of the catalogue -> its first fact's prompt cut after the subject."""
    prefixes: dict[str, str] = {}
    for fact in load_facts(path):
        if fact.subject not in prefixes:
            prefixes[fact.subject] = fact.prompt[: find_subject_chars(fact.prompt, fact.subject)[1]]
    return prefixes


def subject_keys(lm: LoadedModel, layer: int, path: str | Path = DEFAULT_FACTS, batch: int = 64) -> SubjectKeys:
    """The key at each catalogue subject's last token (its prompt up to there, unedited weights); cached on the
    model and on disk (`core.covariance.stats_folder`, by layer and the catalogue's content)."""
    path = Path(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    memo = _CACHE.setdefault(lm.model, {})
    if (layer, digest, batch) in memo:
        return memo[(layer, digest, batch)]
    prefixes = subject_prefixes(path)
    size = lm.arch.mlp_out_shape(lm.model, layer)[1]
    # the batch is in the name: padded batches of other widths round differently, and a cache serves bitwise
    stored_at = stats_folder(lm) / f"subject_keys_layer{layer}_batch{batch}_{digest[:24]}.safetensors"
    stored = load_tensors(stored_at, {"keys": (len(prefixes), size)})
    if stored is not None:
        keys = stored["keys"].to(lm.device)
    else:
        ids = [lm.tokenizer(p).input_ids for p in prefixes.values()]
        found_keys = []
        with unedited(lm):
            for first in range(0, len(ids), batch):
                chunk = ids[first : first + batch]
                width = max(len(i) for i in chunk)
                # right-padded: a causal model's earlier positions never see the padding after them
                padded = torch.tensor([i + [i[-1]] * (width - len(i)) for i in chunk])
                found = layer_keys(lm, layer, padded)
                found_keys += [found[row, len(i) - 1].float() for row, i in enumerate(chunk)]
        keys = torch.stack(found_keys)
        save_tensors(stored_at, {"keys": keys}, {"layer": str(layer), "catalogue": digest})
    result = SubjectKeys(layer, tuple(prefixes), keys)
    memo[(layer, digest, batch)] = result
    return result


def preserved_moment(mom2: torch.Tensor, keys: SubjectKeys, subject: str, weight: float) -> torch.Tensor:
    """C + weight * tr(C)/tr(E) * E over the catalogue's keys other than `subject`'s (case-insensitive)."""
    if weight <= 0:
        return mom2
    own = subject.strip().casefold()
    keep = torch.tensor([name.strip().casefold() != own for name in keys.names])
    others = keys.keys[keep].to(device=mom2.device, dtype=mom2.dtype)
    if not len(others):
        return mom2
    moment = others.T @ others / len(others)
    return mom2 + weight * (mom2.trace() / moment.trace()) * moment


def catalogue_without(path: str | Path, texts: Iterable[str]) -> Path | None:
    """The catalogue less every fact whose subject occurs in one of `texts` (case-insensitive): the same file
    when none does, None when all do (nothing is left to preserve), else a copy in the cache folder named by
    its content."""
    path = Path(path)
    lowered = [t.casefold() for t in texts]
    facts = load_facts(path)
    kept = [f for f in facts if not any(f.subject.casefold() in t for t in lowered)]
    if len(kept) == len(facts):
        return path
    if not kept:
        return None
    data = json.dumps([asdict(f) for f in kept], indent=1).encode()
    out = cache_dir() / "preserve" / f"facts-{hashlib.sha256(data).hexdigest()[:24]}.json"
    if not out.exists():
        write_atomically(out, lambda partial: partial.write_bytes(data))
    return out
