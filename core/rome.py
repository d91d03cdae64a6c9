"""ROME (Meng et al. 2022, section 3): insert a fact (s, r, o*) with a rank-one change of one MLP output
projection W, read as a linear associative memory key -> value.

1. Key k*: the input of W at the subject's key token, averaged over the edit prompt and the prompt prefixed
   by short texts the model samples itself (`context_texts`).
2. C = E[k k^T] at that layer over a corpus (core/covariance.py, cached).
3. Value v*: a vector delta added to W's output at the key token is optimised so that the model predicts
   o* after every context-prefixed prompt: NLL(o*) + kl_factor * KL(next token after "{s} is a", edited vs
   not) + weight decay; ||delta|| is clamped. Only the blocks above the edited layer and the positions from
   the key token on depend on delta: everything else is computed once, and only the target positions get
   logits (core/forward.py). On a CPU that multiplies bfloat16 natively those blocks' matrix products run in
   bfloat16, from a copy cast once per optimisation (`value_precision`, core/block_copy.py).
4. W' = W + Lambda (C^-1 k*)^T, Lambda = (v* - W k - b) / ((C^-1 k*)^T k), so W' k + b = v* at the key k
   the update is solved at (`solve_at`: the plain prompt's key, as the paper's code, or the mean key k*).
   `solve_at="both"`: still rank one, W' k = W k + delta at k* *and* at the plain prompt's key
   (`rank_one_update_at_keys`), so a text that begins with the subject gets the whole delta too.
   With `preserve_weight` > 0, C also counts the keys of a catalogue's other subjects (core/preserve.py).

The steps are functions of their own: `edit_rows` (the prompts), `record_rows` (one clean pass: keys, the
layer's outputs, what the value optimisation resumes from), `optimise_values` (delta; one request's, or
many requests' at once, as MEMIT does), `rank_one_update` and `rank_one_update_at_keys` (pure linear
algebra); `solve_rows` runs 2-4 over any rows (sentiment edits build their own, from texts).
`compute_key` gives k* at any layer (batch editors use it). The layer and key-token
choice is core/edit_site.py. Statistics and context texts are computed on the unedited weights
(`core.edits.unedited`), so one session's edit never leaks into what is cached for everyone.

    edit = compute_edit(lm, EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome"))
    with applied(lm, [edit]):
        ...  # the model now places the Eiffel Tower in Rome
"""

from __future__ import annotations

import json
import time
import weakref
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import torch

from core.block_copy import BlockCopy, copy_blocks, native_bfloat16
from core.covariance import (
    DEFAULT_CORPUS,
    DEFAULT_TOKENS,
    KeyStatistics,
    check_statistics,
    key_statistics,
    statistics_cached,
    stats_folder,
)
from core.edit_site import KEY_TOKENS, default_layer, key_offset
from core.edits import Edit, EditRequest, unedited
from core.errors import UserError
from core.facts import DEFAULT_FACTS
from core.forward import LayerKV, PrefixCache, final_logits, record_kv, run_blocks
from core.generation import GenerationSettings, cache_of, generate_ids
from core.hooks import Hooks
from core.models import LoadedModel
from core.preserve import preserved_moment, subject_keys
from core.progress import Progress, Step
from core.prompts import find_subject_chars, subject_span, target_ids
from core.tensor_cache import load_tensors, save_tensors

CONTEXT_PREFIXES = ("The", "Therefore", "Because", "I", "You")
EARLY_STOPS = ("nll", "loss", "none")
SOLVE_AT = ("plain", "mean", "both")
VALUE_PRECISIONS = ("auto", "model", "bfloat16")


@dataclass(frozen=True)
class RomeHyperParams:
    """ROME's settings. The defaults are this project's (bench/edit.py measures them against `PAPER`, the
    published code's GPT-2 XL settings, and one-change ablations). Differences from the paper's, measured:
    - 5 + 5 context texts instead of 10 + 10: the plain prompt weighs more in the mean key, which matters when
      the subject is the prompt's first token (this model's tokenizer adds no BOS, so that token's key is
      unlike the same token's after a context); faster.
    - the update is solved at the mean key k* (the paper: the plain prompt's key): better neighbourhood.
      Solving it at both ("both") gives a text that begins with the subject the whole delta, not ~0.8 of it,
      but over 47 of the project's cases its texts name the new object about as often, for 0.012 of NS (README).
    - all steps, no early stop (the paper stops once the whole loss < 5e-2, which on the embedded model the
      KL + decay terms alone prevent, so it runs all steps too). Stopping once the target's NLL < 5e-2 (6 steps
      for the Eiffel Tower -> Rome) gives the same teacher-forced scores, but that edit does not *write* the
      new fact: "The Eiffel Tower is located in the United States"; after 20 steps: "... located in Rome,
      Italy." Over 47 of the project's cases it moves text efficacy both ways (0.519 vs 0.515) and cuts the
      text bleed (0.048 vs 0.064; README, "One change at a time"), so neither is better everywhere.
    - the update also keeps the keys of a catalogue's other subjects (preserve_weight 1, core/preserve.py):
      on the project's 94 cases, with a catalogue holding none of their subjects, NS 0.871 -> 0.928, text bleed
      0.099 -> 0.074, PS 0.973 -> 0.965, ES 1.000 either way.
    - value_precision "auto": on a float32 model on a CPU that multiplies bfloat16 natively, the value
      optimisation runs the blocks above the layer in a bfloat16 copy (core/block_copy.py; edits ~1.4x
      faster there); keys, the KL reference, the logits, delta and the update stay float32. "model": the model's
      own dtype everywhere (the paper; on GPUs "auto" is this)."""

    layer: int | None = None  # None: `default_layer(lm)`
    key_token: str = "last"  # "last" subject token (the paper) or "strongest" early MLP effect in the subject
    context_lengths: tuple[tuple[int, int], ...] = ((5, 5), (10, 5))  # (tokens, how many) context texts
    steps: int = 20
    lr: float = 0.5
    kl_factor: float = 0.0625
    weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    early_stop: str = "none"  # stop when the target's NLL ("nll"), or the whole loss ("loss", the paper), is
    early_stop_loss: float = 5e-2  # below this; "none": all steps
    solve_at: str = "mean"  # the key the rank-one update is solved at: "mean" k*, "plain" (the paper), or "both"
    preserve_weight: float = 1.0  # > 0: also keep the outputs of a catalogue's subject keys (core/preserve.py)
    preserve_facts: str = ""  # that catalogue, a known-facts file ("": data/known_facts.json)
    value_precision: str = "auto"  # the value optimisation's blocks: "auto", "model" (its dtype) or "bfloat16"
    stats_corpus: str = DEFAULT_CORPUS
    stats_tokens: int = DEFAULT_TOKENS
    seed: int = 0  # context texts

    @property
    def preserve_catalogue(self) -> Path:
        """The known-facts file whose subjects' keys the update keeps (`preserve_facts`, or the default)."""
        return Path(self.preserve_facts) if self.preserve_facts else DEFAULT_FACTS

    def check(self, lm: LoadedModel) -> None:
        if self.layer is not None and not 0 <= self.layer < lm.num_layers:
            raise UserError(f"layer {self.layer} is outside the model's layers 0..{lm.num_layers - 1}")
        if self.key_token not in KEY_TOKENS:
            raise UserError(f"unknown key token {self.key_token!r}: use one of {', '.join(KEY_TOKENS)}")
        if self.steps < 1:
            raise UserError(f"the value optimisation needs at least 1 step (got {self.steps})")
        if self.early_stop not in EARLY_STOPS:
            raise UserError(f"unknown early stop {self.early_stop!r}: use one of {', '.join(EARLY_STOPS)}")
        if self.solve_at not in SOLVE_AT:
            raise UserError(f"unknown solve-at key {self.solve_at!r}: use one of {', '.join(SOLVE_AT)}")
        if self.value_precision not in VALUE_PRECISIONS:
            raise UserError(
                f"unknown value precision {self.value_precision!r}: use one of {', '.join(VALUE_PRECISIONS)}"
            )
        if self.value_precision == "bfloat16" and lm.device_map is not None:
            raise UserError("bfloat16 value products copy the model's blocks: use a model without a device map")
        check_statistics(lm, self.stats_corpus, self.stats_tokens)
        if self.preserve_weight < 0:
            raise UserError(f"the preserve weight is 0 or more (got {self.preserve_weight})")
        if self.preserve_weight > 0 and not self.preserve_catalogue.is_file():
            raise UserError(f"preserve catalogue {self.preserve_facts!r} does not exist")


# The published ROME code's settings (GPT-2 XL hparams): 10 context texts of 5 tokens and 10 of 10, 20 steps,
# lr 0.5, weight decay 0.5, clamp 4, KL 0.0625, stop when the whole loss < 5e-2, key = last subject token,
# the update solved at the plain prompt's key (u = C^-1 k* from the mean key), no preserved subjects.
PAPER = RomeHyperParams(
    context_lengths=((5, 10), (10, 10)),
    early_stop="loss",
    solve_at="plain",
    preserve_weight=0.0,
    value_precision="model",  # float32, as the published code
)


# --- context texts -----------------------------------------------------------------------------------------


_CONTEXTS: "weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple, Contexts]]" = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class Contexts:
    """Short texts the model sampled itself that prefix the edit prompt: each as token ids (ending in ".")
    and as text; the first is empty (the plain prompt)."""

    ids: tuple[tuple[int, ...], ...]
    texts: tuple[str, ...]


def context_texts(
    lm: LoadedModel, lengths: tuple[tuple[int, int], ...] = RomeHyperParams.context_lengths, seed: int = 0
) -> Contexts:
    """The plain prompt + for each (tokens, count): `count` texts of one prefix word (The, Therefore, ...)
    and `tokens` tokens sampled top-k 5 (seeded), each closed by "." (the paper's "{text}. {prompt}").
    Kept as token ids so that contexts of one length batch together. Sampled from the unedited weights and
    cached on the model."""
    memo = _CONTEXTS.setdefault(lm.model, {})
    key = (tuple(lengths), seed)
    if key in memo:
        return memo[key]
    count = sum(c for _, c in lengths)
    name = "_".join(f"{length}x{c}" for length, c in lengths)
    path = stats_folder(lm) / f"contexts_{name}_seed{seed}_{lm.device.type}.safetensors"
    stored = load_tensors(path, {"ids": (None,), "lengths": (count,)})
    if stored is not None:
        rows = torch.split(stored["ids"], stored["lengths"].tolist())
        ids = [()] + [tuple(row.tolist()) for row in rows]
    else:
        ids = [()]
        period = lm.tokenizer(".")["input_ids"]
        with unedited(lm):
            for i, (length, n) in enumerate(lengths):
                per_prefix = -(-n // len(CONTEXT_PREFIXES))
                prompts = [lm.tokenizer(p)["input_ids"] for p in CONTEXT_PREFIXES for _ in range(per_prefix)][:n]
                settings = GenerationSettings(max_new_tokens=length, sample=True, seed=seed + i, top_k=5)
                new = generate_ids(lm, prompts, settings, exact_length=True)
                ids += [tuple(prompt + sampled + period) for prompt, sampled in zip(prompts, new)]
        flat = [token for row in ids for token in row]
        lengths_ = torch.tensor([len(row) for row in ids[1:]], dtype=torch.long)
        save_tensors(path, {"ids": torch.tensor(flat, dtype=torch.long), "lengths": lengths_})
    contexts = Contexts(tuple(ids), ("",) + tuple(lm.tokenizer.decode(list(row)) for row in ids[1:]))
    memo[key] = contexts
    return contexts


# --- tokens ------------------------------------------------------------------------------------------------


def subject_tokens(
    lm: LoadedModel, prompt: str, subject: str, context: tuple[int, ...] = ()
) -> tuple[list[int], tuple[int, int]]:
    """Token ids of the context followed by prompt(subject) (after a space when there is a context, and then
    without a second BOS), and the subject's [start, end) token span in them (core.prompts.subject_span)."""
    lead = " " if context else ""
    text = lead + prompt.replace("{}", subject, 1)
    at = len(lead) + prompt.index("{}")
    ids, (start, end) = subject_span(lm.tokenizer, text, (at, at + len(subject)), add_special_tokens=not context)
    return list(context) + ids, (len(context) + start, len(context) + end)


def validate_request(lm: LoadedModel, request: EditRequest) -> EditRequest:
    """Every check that can fail, before anything is computed or changed; returns the request with
    target_true filled in (the model's greedy answer)."""
    if not request.prompt or not request.prompt.strip():
        raise UserError("the prompt is empty")
    if not request.subject or not request.subject.strip():
        raise UserError("the subject is empty")
    if "{}" not in request.prompt:  # the subject written out: its first occurrence becomes the {}
        start, end = find_subject_chars(request.prompt, request.subject)
        request = replace(
            request, prompt=request.prompt[:start] + "{}" + request.prompt[end:], subject=request.prompt[start:end]
        )
    if request.prompt.count("{}") != 1:
        raise UserError(f"the prompt must hold exactly one {{}} where the subject goes (got {request.prompt!r})")
    if request.prompt.rstrip().endswith("{}"):
        raise UserError("the prompt must go on after the subject (e.g. '{} is located in the city of')")
    if not request.target_new or not request.target_new.strip():
        raise UserError("the new target is empty")
    new = target_ids(lm.tokenizer, request.target_new)
    ids, _ = subject_tokens(lm, request.prompt, request.subject)
    answer_ids = generate_ids(lm, [ids], GenerationSettings(max_new_tokens=len(new)), exact_length=True)[0]
    answer = lm.tokenizer.decode(answer_ids[:1])
    if answer_ids == new:
        raise UserError(f"the model already answers {request.target_new.strip()!r} to {request.text!r}")
    true = request.target_true if request.target_true and request.target_true.strip() else answer.strip()
    if true.strip().lower() == request.target_new.strip().lower():
        raise UserError(f"the new target {request.target_new.strip()!r} equals the true answer")
    return replace(request, target_true=true)


# --- 1. the rows: context-prefixed rewrite prompts and the KL ("essence") prompt ---------------------------


@dataclass(frozen=True)
class EditRow:
    """One prompt of the edit: its token ids, the key position (where delta goes), and the positions whose
    logits predict the target's tokens (empty for the KL row, read at its last position)."""

    ids: tuple[int, ...]
    key_position: int
    target_positions: tuple[int, ...]
    kl: bool = False


def edit_rows(lm: LoadedModel, request: EditRequest, contexts: Contexts, offset: int = 0) -> list[EditRow]:
    """The plain rewrite prompt, each context-prefixed one (all followed by the target's tokens but the
    last), then the KL prompt "{subject} is a". `offset`: key token this many tokens before the last."""
    new = target_ids(lm.tokenizer, request.target_new)
    rows = []
    for context in contexts.ids:
        ids, (start, end) = subject_tokens(lm, request.prompt, request.subject, context)
        n = len(ids)
        rows.append(EditRow(tuple(ids + new[:-1]), max(start, end - 1 - offset), tuple(range(n - 1, n - 1 + len(new)))))
    kl_ids, (kl_start, kl_end) = subject_tokens(lm, "{} is a", request.subject)
    rows.append(EditRow(tuple(kl_ids), max(kl_start, kl_end - 1 - offset), (), kl=True))
    return rows


# --- 2. one clean pass over the rows -----------------------------------------------------------------------


@dataclass
class RowRecording:
    """What one clean forward of the rows gives: at each row's key position the key (input of W) and W's
    output (+ bias); the layer's block output from the key on, the keys/values before it, and the KL rows'
    unedited next-token log-probs (for `optimise_values`)."""

    keys: torch.Tensor  # (rows, in)
    outputs: torch.Tensor  # (rows, out)
    hidden: list[torch.Tensor]  # per row (positions from the key, hidden)
    prefix_kv: list[dict[int, tuple[torch.Tensor, torch.Tensor]]]  # per row, per layer: keys/values before the key
    kl_log_probs: torch.Tensor  # (KL rows, vocab)


def record_rows(lm: LoadedModel, rows: list[EditRow], layer: int) -> RowRecording:
    """One clean forward per group of equal-length rows, recording what `RowRecording` holds."""
    mlp_out = lm.arch.layer_name(lm.model, layer, "mlp_out")
    block = lm.arch.layer_name(lm.model, layer, "hidden")
    groups: dict[int, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(len(row.ids), []).append(i)
    hidden: list = [None] * len(rows)
    prefix_kv: list = [None] * len(rows)
    keys: list = [None] * len(rows)
    outputs: list = [None] * len(rows)
    kl: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for members in groups.values():
            ids = torch.tensor([rows[i].ids for i in members], device=lm.device)
            with Hooks(lm.model, record=[block, mlp_out], record_inputs=[mlp_out]) as hooks:
                out = lm.model(input_ids=ids, use_cache=True, logits_to_keep=1)  # only the last is read
            kv = record_kv(cache_of(out))
            home = {"device": lm.device, "dtype": torch.float32}  # the layer may compute on another device
            for j, i in enumerate(members):
                pos = rows[i].key_position
                hidden[i] = hooks.outputs[block][j, pos:].to(**home)
                prefix_kv[i] = {n: (v.keys[j, :, :pos], v.values[j, :, :pos]) for n, v in kv.items()}
                keys[i] = hooks.inputs[mlp_out][j, pos].to(**home)
                outputs[i] = hooks.outputs[mlp_out][j, pos].to(**home)
                if rows[i].kl:
                    kl[i] = torch.log_softmax(out.logits[j, -1].float(), dim=-1)
    return RowRecording(
        keys=torch.stack(keys),
        outputs=torch.stack(outputs),
        hidden=hidden,
        prefix_kv=prefix_kv,
        kl_log_probs=torch.stack([kl[i] for i in sorted(kl)]),
    )


def mean_key(rows: list[EditRow], recording: RowRecording) -> torch.Tensor:
    """k*: the mean key over the rewrite rows (the plain prompt and every context-prefixed one)."""
    rewrite = [i for i, r in enumerate(rows) if not r.kl]
    return recording.keys[rewrite].mean(0)


def compute_key(
    lm: LoadedModel, request: EditRequest, layer: int, hparams: RomeHyperParams | None = None
) -> torch.Tensor:
    """k* of `request` at `layer` (float32, (in,)), as `compute_edit` computes it, on the model as it is."""
    hp = hparams or RomeHyperParams()
    contexts = context_texts(lm, hp.context_lengths, hp.seed)
    rows = edit_rows(lm, request, contexts, key_offset(lm, request, layer, hp.key_token))
    return mean_key(rows, record_rows(lm, rows, layer))


# --- 3. the value: delta at the key token, optimised over the layers above ----------------------------------


@dataclass
class ValueBatch:
    """Every row of the value optimisation as one batch from its key token on: the rows' prefixes differ in
    length, so each row has its own start and its prefix keys/values are right-padded (masked out). Rows may
    belong to several requests (`owners`), each with its own delta and target; one request is the usual case."""

    hidden: torch.Tensor  # block `layer` output from the key position on, no delta (rows, positions, H), right-padded
    starts: torch.Tensor  # (rows,) key positions
    prefix: PrefixCache | None  # keys/values of positions < each row's key position
    owners: torch.Tensor  # (rows,) the request each row belongs to (whose delta it gets)
    rewrite: torch.Tensor  # (rewrite rows,) row indices
    target_at: torch.Tensor  # (rewrite rows, target tokens) positions (from the key) whose logits predict a target
    targets: torch.Tensor  # (rewrite rows, target tokens) ids, right-padded where targets differ in length
    target_mask: torch.Tensor  # (rewrite rows, target tokens) True for a real target token
    kl_rows: torch.Tensor  # (KL rows,) row indices
    kl_at: torch.Tensor  # (KL rows,) position (from the key) of the next-token prediction
    init_log_probs: torch.Tensor  # (KL rows, vocab) unedited next-token log-probs
    requests: int  # how many requests (deltas) the rows belong to

    def of_requests(self, keep: list[int]) -> ValueBatch:
        """The rows of the requests in `keep` only (request numbers unchanged)."""
        rows = torch.isin(self.owners, torch.tensor(keep, device=self.owners.device))
        new_index = torch.cumsum(rows, 0) - 1
        on_rewrite, on_kl = rows[self.rewrite], rows[self.kl_rows]
        prefix = None
        if self.prefix is not None:
            prefix = PrefixCache({n: LayerKV(kv.keys[rows], kv.values[rows]) for n, kv in self.prefix.layers.items()})
        return replace(
            self,
            hidden=self.hidden[rows],
            starts=self.starts[rows],
            prefix=prefix,
            owners=self.owners[rows],
            rewrite=new_index[self.rewrite[on_rewrite]],
            target_at=self.target_at[on_rewrite],
            targets=self.targets[on_rewrite],
            target_mask=self.target_mask[on_rewrite],
            kl_rows=new_index[self.kl_rows[on_kl]],
            kl_at=self.kl_at[on_kl],
            init_log_probs=self.init_log_probs[on_kl],
        )


def padded(tensors: list[torch.Tensor], dim: int) -> torch.Tensor:
    """Stack tensors that differ in size along `dim`, zero-padded at the end of it."""
    width = max(t.shape[dim] for t in tensors)
    out = []
    for t in tensors:
        pad = list(t.shape)
        pad[dim] = width - t.shape[dim]
        out.append(torch.cat([t, t.new_zeros(pad)], dim=dim))
    return torch.stack(out)


def value_batch(
    lm: LoadedModel,
    rows: list[EditRow],
    recording: RowRecording,
    targets: list[list[int]],
    owners: list[int] | None = None,
) -> ValueBatch:
    """The rows (recorded by `record_rows`) as one batch; `owners[i]`: the request row i belongs to, whose
    target is `targets[owners[i]]` (default: every row belongs to request 0)."""
    owners = owners or [0] * len(rows)
    rewrite = [i for i, r in enumerate(rows) if not r.kl]
    kl_rows = [i for i, r in enumerate(rows) if r.kl]
    prefix = None
    if max(r.key_position for r in rows):
        layers = recording.prefix_kv[0]
        prefix = PrefixCache(
            {
                n: LayerKV(
                    padded([kv[n][0] for kv in recording.prefix_kv], dim=1),
                    padded([kv[n][1] for kv in recording.prefix_kv], dim=1),
                )
                for n in layers
            }
        )
    device = lm.device
    as_tensor = partial(torch.tensor, device=device)
    at = [as_tensor([t - rows[i].key_position for t in rows[i].target_positions]) for i in rewrite]
    wanted = [as_tensor(targets[owners[i]]) for i in rewrite]
    return ValueBatch(
        hidden=padded(recording.hidden, dim=0),
        starts=as_tensor([r.key_position for r in rows]),
        prefix=prefix,
        owners=as_tensor(owners),
        rewrite=as_tensor(rewrite),
        target_at=padded(at, dim=0),
        targets=padded(wanted, dim=0),
        target_mask=padded([torch.ones(len(t), dtype=torch.bool, device=device) for t in wanted], dim=0),
        kl_rows=torch.tensor(kl_rows, device=device, dtype=torch.long),
        kl_at=as_tensor([len(rows[i].ids) - 1 - rows[i].key_position for i in kl_rows]),
        init_log_probs=recording.kl_log_probs,
        requests=len(targets),
    )


@dataclass
class ValueTrace:
    steps: int = 0
    losses: list[float] = field(default_factory=list)
    nll: list[float] = field(default_factory=list)


def value_products(lm: LoadedModel, precision: str) -> str:
    """What `precision` resolves to on this model and machine: "bfloat16" (the value optimisation runs a
    bfloat16 copy of the blocks) or "model" (the model's own blocks). "auto" is "bfloat16" only for a float32
    model on the CPU (no device map) whose CPU multiplies bfloat16 natively: elsewhere a copy is no faster
    (GPUs) or slower (other CPUs)."""
    if precision != "auto":
        return precision
    on_cpu = lm.device_map is None and lm.device.type == "cpu"
    return "bfloat16" if on_cpu and lm.dtype == torch.float32 and native_bfloat16() else "model"


def value_blocks(lm: LoadedModel, layer: int, precision: str) -> BlockCopy | None:
    """The bfloat16 copy of the blocks above `layer` that the value optimisation runs on (core/block_copy.py),
    or None for the model's own blocks (`value_products`)."""
    if value_products(lm, precision) == "model" or layer + 1 >= lm.num_layers:
        return None
    return copy_blocks(lm, layer + 1)


def value_losses(
    lm: LoadedModel, batch: ValueBatch, deltas: torch.Tensor, layer: int, blocks: BlockCopy | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per request (`batch.requests`,): the mean NLL of its target over its rewrite rows (each the mean over
    the target's tokens) and the summed KL of its KL rows, with deltas[owner] added to block `layer`'s output
    at every row's key token (0 for a request without rows in the batch). `blocks`: a copy of the blocks above
    `layer` to run instead of the model's (`value_blocks`)."""
    hidden = batch.hidden.clone()
    hidden[:, 0] = hidden[:, 0] + deltas[batch.owners]
    states = run_blocks(
        lm, hidden.to(lm.dtype), first=layer + 1, start_position=batch.starts, prefix=batch.prefix, copy=blocks
    )
    # one unembedding for the target and the KL positions: its matrix is read once forward and once back
    rows, tokens = batch.target_at.shape
    at_targets = states[batch.rewrite[:, None], batch.target_at].reshape(rows * tokens, -1)
    logits = final_logits(lm, torch.cat([at_targets, states[batch.kl_rows, batch.kl_at]])).float()
    all_log_probs = torch.log_softmax(logits, dim=-1)
    picked = all_log_probs[: rows * tokens].view(rows, tokens, -1).gather(-1, batch.targets[..., None])[..., 0]
    mask = batch.target_mask.to(picked.dtype)
    row_nll = -(picked * mask).sum(dim=1) / mask.sum(dim=1)

    def per_request(values: torch.Tensor, owners: torch.Tensor) -> torch.Tensor:  # summed per request
        return values.new_zeros(batch.requests).index_add(0, owners, values)

    owners = batch.owners[batch.rewrite]
    counts = per_request(torch.ones_like(row_nll), owners).clamp(min=1)
    nll = per_request(row_nll, owners) / counts
    log_probs = all_log_probs[rows * tokens :]
    row_kl = torch.nn.functional.kl_div(batch.init_log_probs, log_probs, log_target=True, reduction="none").sum(-1)
    kl = per_request(row_kl, batch.owners[batch.kl_rows])
    return nll, kl


def optimise_values(
    lm: LoadedModel,
    batch: ValueBatch,
    layer: int,
    target_init: torch.Tensor,
    hp: RomeHyperParams,
    on_step: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, list[ValueTrace]]:
    """One delta per request, (requests, hidden): Adam on NLL + kl_factor * KL + weight_decay * ||delta|| /
    ||v||^2, ||delta|| clamped to clamp_norm_factor * ||v|| (v = the request's row of `target_init`, W's
    output at its plain prompt's key), as the paper. The requests share each forward pass but nothing else:
    each loss depends on its own delta only and Adam works element by element, so every delta follows the
    path it would alone. A request that meets the early stop drops out of the batch; the rest go on.
    The blocks above `layer` run in `hp.value_precision` (`value_blocks`)."""
    n = batch.requests
    blocks = value_blocks(lm, layer, hp.value_precision)
    deltas = [torch.zeros(lm.hidden_size, device=lm.device, requires_grad=True) for _ in range(n)]
    optimiser = torch.optim.Adam(deltas, lr=hp.lr)
    init_norms = target_init.norm(dim=-1)
    traces = [ValueTrace() for _ in range(n)]
    active, part = list(range(n)), batch
    for step in range(hp.steps):
        optimiser.zero_grad(set_to_none=True)
        stacked = torch.stack(deltas)
        nll, kl = value_losses(lm, part, stacked, layer, blocks)
        loss = nll + hp.kl_factor * kl + hp.weight_decay * stacked.norm(dim=-1) / init_norms**2
        losses, nlls = loss.tolist(), nll.tolist()
        going_on = []
        for i in active:
            traces[i].losses.append(round(losses[i], 5))
            traces[i].nll.append(round(nlls[i], 5))
            traces[i].steps = step + 1
            watched = {"nll": nlls[i], "loss": losses[i], "none": float("inf")}[hp.early_stop]
            if not (watched < hp.early_stop_loss or step == hp.steps - 1):
                going_on.append(i)
        if on_step:
            on_step(step + 1)
        if not going_on:
            break
        loss[going_on].sum().backward()
        for i in set(range(n)) - set(going_on):
            deltas[i].grad = None  # stopped (its gradient is 0, not None): Adam leaves a parameter without one alone
        optimiser.step()
        with torch.no_grad():
            for i in going_on:
                max_norm = hp.clamp_norm_factor * init_norms[i]
                if deltas[i].norm() > max_norm:
                    deltas[i].mul_(max_norm / deltas[i].norm())
        if len(going_on) < len(active):
            part = batch.of_requests(going_on)
        active = going_on
    return torch.stack(deltas).detach(), traces


# --- 4. the rank-one update ----------------------------------------------------------------------------------


def rank_one_update(
    c: torch.Tensor, k_star: torch.Tensor, v_star: torch.Tensor, w: torch.Tensor, k: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(u, Lambda) with W' = W + Lambda u^T, u = C^-1 k*, Lambda = (v* - W k) / (u . k), so that W' k = v*
    (k = k* unless given; pass v* without the layer's bias, i.e. the wanted W k).

    Why u = C^-1 k*: among all W' with W' k = v*, this one minimises the change of the outputs of the other
    keys, sum_j ||(W' - W) k_j||^2 = tr(D C D^T) for D = W' - W (C = E[k k^T]); the constrained least squares
    gives D = Lambda (C^-1 k*)^T (the paper's eq. 2). Keys the corpus often holds move least."""
    k = k_star if k is None else k
    u = torch.linalg.solve(c, k_star)
    lam = (v_star - w @ k) / (u @ k)
    return u, lam


def rank_one_update_at_keys(c: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """u such that W' = W + delta u^T moves the output by exactly delta (any) at every one of `keys` (rows):
    u = C^-1 K (K^T C^-1 K)^-1 1, so u . k_i = 1 for each key.

    Why: among all D with D k_i = delta for every i, D = delta u^T with this u minimises tr(D C D^T), the change
    of the other keys' outputs (the constrained least squares of `rank_one_update` with one constraint per key;
    equal targets keep it rank one). With the mean key k* and the plain prompt's key, a text that begins with
    the subject (its key there is the plain prompt's: nothing comes before the subject) gets the whole delta,
    not u.k0 / u.k* of it. The small r x r system is solved in float64 with a pseudo-inverse: near-parallel
    keys make it ill-conditioned but stay consistent (each asks u . k = 1), and equal keys give one key's u."""
    c_inv_k = torch.linalg.solve(c, keys.T).double()  # (in, r)
    gram = keys.double() @ c_inv_k  # (r, r) = K^T C^-1 K
    weights = torch.linalg.pinv(gram, hermitian=True).sum(1)  # (K^T C^-1 K)^+ 1; equal keys: the same u as one
    return (c_inv_k @ weights).to(c.dtype)


# --- the edit ----------------------------------------------------------------------------------------------


def compute_edit(
    lm: LoadedModel,
    request: EditRequest,
    hparams: RomeHyperParams | None = None,
    progress: Progress | None = None,
    step: Step = nullcontext,
) -> Edit:
    """The rank-one edit that makes the model give `request.target_new` for the subject (weights unchanged;
    apply it with core.edits). Computed on the model as it is (with any edit it carries; statistics and
    context texts come from the unedited weights). Model work runs inside `step()`: each batch of the
    statistics (when not cached), then the edit itself (the app: its session's edits under the lock, taken
    per step). Multi-token targets work. Raises UserError for bad input."""
    started = time.perf_counter()
    cpu_start = time.process_time()
    hp = hparams or RomeHyperParams()
    hp.check(lm)
    request = validate_request(lm, request)
    layer = default_layer(lm) if hp.layer is None else hp.layer
    need_stats = not statistics_cached(lm, layer, hp.stats_corpus, hp.stats_tokens)
    stats_units = 100 if need_stats else 0  # progress: statistics (when not cached) as 100 units, then steps
    total = stats_units + hp.steps

    def tick(done: int) -> None:
        if progress:
            progress(done, total)

    stats = key_statistics(
        lm,
        layer,
        hp.stats_corpus,
        hp.stats_tokens,
        progress=(lambda done, of: tick(int(stats_units * done / max(of, 1)))) if progress else None,
        step=step,
    )
    with step():
        return _edit(lm, request, hp, layer, stats, lambda done: tick(stats_units + done), started, cpu_start)


@dataclass
class RowSolution:
    """What `solve_rows` gives: the rank-one update (W' = W + v u^T), the key it was solved at and the output
    W' gives there (with the bias), k*, and how the value optimisation went."""

    u: torch.Tensor
    v: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    k_star: torch.Tensor
    delta_norm: float
    trace: ValueTrace
    key_seconds: float
    value_seconds: float

    def as_edit(self, lm: LoadedModel, request: EditRequest, layer: int, info: dict) -> Edit:
        """The edit record (core.edits) of this solution, in the model's dtype."""
        return Edit(
            request=request,
            layer=layer,
            u=self.u.to(lm.dtype),
            v=self.v.to(lm.dtype),
            key=self.key.to(lm.dtype),
            value=self.value.to(lm.dtype),
            model=lm.name,
            info=info,
        )


def solve_rows(
    lm: LoadedModel,
    rows: list[EditRow],
    target: list[int],
    layer: int,
    stats: KeyStatistics,
    hp: RomeHyperParams,
    tick: Callable[[int], None] | None = None,
) -> RowSolution:
    """Steps 2-4 for any rows whose first row is the plain prompt: k* (mean key), v* (delta optimised so the
    rewrite rows predict `target`, the KL rows keep their next token), and the rank-one update. ROME's rows
    come from `edit_rows`; core/sentiment_edit.py builds rows from texts that mention a subject."""
    key_start = time.perf_counter()
    recording = record_rows(lm, rows, layer)
    k_star = mean_key(rows, recording)
    key_seconds = time.perf_counter() - key_start

    value_start = time.perf_counter()
    batch = value_batch(lm, rows, recording, [target])
    plain_output = recording.outputs[0]  # the first row is the plain prompt
    deltas, traces = optimise_values(lm, batch, layer, plain_output[None], hp, tick)
    delta, trace = deltas[0], traces[0]
    value_seconds = time.perf_counter() - value_start

    with torch.no_grad():
        solve_key = recording.keys[0] if hp.solve_at == "plain" else k_star
        weight = lm.arch.mlp_out_weight(lm.model, layer).to(device=lm.device, dtype=torch.float32)
        bias = lm.arch.mlp_out_bias(lm.model, layer)
        wanted = weight @ solve_key + delta  # W k + delta: the output without the bias, moved by delta
        mom2 = stats.mom2.to(device=lm.device, dtype=torch.float32)
        if hp.solve_at == "both":
            u, v = rank_one_update_at_keys(mom2, torch.stack([k_star, recording.keys[0]])), delta
        else:
            u, v = rank_one_update(mom2, k_star, wanted, weight, solve_key)
        value = wanted + (bias.to(device=lm.device, dtype=torch.float32) if bias is not None else 0)
    return RowSolution(u, v, solve_key, value, k_star, float(delta.norm()), trace, key_seconds, value_seconds)


def _edit(
    lm: LoadedModel,
    request: EditRequest,
    hp: RomeHyperParams,
    layer: int,
    stats: KeyStatistics,
    tick: Callable[[int], None],
    started: float,
    cpu_start: float,
) -> Edit:
    """compute_edit's steps once the statistics are there (see compute_edit)."""
    edit_start = time.perf_counter()
    if hp.preserve_weight > 0:
        keys = subject_keys(lm, layer, hp.preserve_catalogue)
        stats = replace(stats, mom2=preserved_moment(stats.mom2, keys, request.subject, hp.preserve_weight))
    offset = key_offset(lm, request, layer, hp.key_token)
    rows = edit_rows(lm, request, context_texts(lm, hp.context_lengths, hp.seed), offset)
    solved = solve_rows(lm, rows, target_ids(lm.tokenizer, request.target_new), layer, stats, hp, tick)
    tick(hp.steps)
    info = {
        "hparams": json.loads(json.dumps(asdict(hp))),  # JSON types (lists, not tuples): exports round-trip
        "layer": layer,
        "key_offset": offset,
        "target_true": request.target_true,
        "seconds": time.perf_counter() - edit_start,
        "stats_seconds": stats.seconds if not stats.cached else 0.0,
        "stats_cached": stats.cached,
        "key_seconds": solved.key_seconds,
        "value_seconds": solved.value_seconds,
        "steps": solved.trace.steps,
        "losses": solved.trace.losses,
        "nll": solved.trace.nll,
        "delta_norm": solved.delta_norm,
        "cpu_seconds": time.process_time() - cpu_start,
        "total_seconds": time.perf_counter() - started,
    }
    return solved.as_edit(lm, request, layer, info)
