"""ROME (Meng et al. 2022, section 3): insert a fact (s, r, o*) with a rank-one change of one MLP output
projection W, read as a linear associative memory key -> value.

1. Key k*: the input of W at the subject's key token, averaged over the edit prompt and the prompt prefixed
   by short texts the model samples itself (`context_texts`).
2. C = E[k k^T] at that layer over a corpus (core/covariance.py, cached).
3. Value v*: a vector delta added to W's output at the key token is optimised so that the model predicts
   o* after every context-prefixed prompt: NLL(o*) + kl_factor * KL(next token after "{s} is a", edited vs
   not) + weight decay; ||delta|| is clamped. Only the blocks above the edited layer and the positions from
   the key token on depend on delta: everything else is computed once, and only the target positions get
   logits (core/forward.py).
4. W' = W + Lambda (C^-1 k*)^T, Lambda = (v* - W k* - b) / ((C^-1 k*)^T k*), so W' k* + b = v*.

    edit = compute_edit(lm, EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome"))
    with applied(lm, [edit]):
        ...  # the model now places the Eiffel Tower in Rome
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import torch

from core.covariance import DEFAULT_CORPUS, DEFAULT_TOKENS, key_statistics, statistics_cached
from core.edits import Edit, EditRequest
from core.errors import UserError
from core.forward import LayerKV, PrefixCache, final_logits, record_kv, run_blocks
from core.generation import GenerationSettings, cache_of, generate_ids
from core.hooks import Hooks
from core.models import EMBEDDED_MODEL, LoadedModel
from core.prompts import find_subject_chars

Progress = Callable[[int, int], None]

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
CONTEXT_PREFIXES = ("The", "Therefore", "Because", "I", "You")


@dataclass(frozen=True)
class RomeHyperParams:
    """The paper's defaults (GPT-2 XL hyper-parameters of the ROME code), except the statistics corpus and the
    number of context texts: 5 + 5 instead of 10 + 10. Measured on the first 30 cases of
    data/counterfact_project.json (embedded model, layer 3): 10 + 10 gave ES 0.933 PS 0.967 NS 0.938 and
    18 s per edit; 5 + 5 gave ES 1.000 PS 0.967 NS 0.954 and 13 s (before the one-batch value optimisation).
    The plain prompt weighs more in the mean key, which matters when the subject is the prompt's first token
    (this model's tokenizer adds no BOS, so that token's key is unlike the same token's after a context)."""

    layer: int | None = None  # None: `default_layer(lm)`
    key_token: str = "last"  # "last" subject token (the paper) or "strongest" early MLP effect in the subject
    context_lengths: tuple[tuple[int, int], ...] = ((5, 5), (10, 5))  # (tokens, how many) context texts
    steps: int = 20
    lr: float = 0.5
    kl_factor: float = 0.0625
    weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    early_stop_loss: float = 5e-2  # stop once the target's NLL is below this (the paper compares the whole
    # loss; on the embedded model the KL + decay terms alone stay above 5e-2, so it would never stop early)
    stats_corpus: str = DEFAULT_CORPUS
    stats_tokens: int = DEFAULT_TOKENS
    seed: int = 0  # context texts

    def check(self, lm: LoadedModel) -> None:
        if self.layer is not None and not 0 <= self.layer < lm.num_layers:
            raise UserError(f"layer {self.layer} is outside the model's layers 0..{lm.num_layers - 1}")
        if self.key_token not in KEY_TOKENS:
            raise UserError(f"unknown key token {self.key_token!r}: use one of {', '.join(KEY_TOKENS)}")
        if self.steps < 1:
            raise UserError(f"the value optimisation needs at least 1 step (got {self.steps})")


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


# --- context texts -----------------------------------------------------------------------------------------


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
    Kept as token ids so that contexts of one length batch together. Cached on the model."""
    memo = lm.extra.setdefault("rome_contexts", {})
    key = (tuple(lengths), seed)
    if key in memo:
        return memo[key]
    ids: list[tuple[int, ...]] = [()]
    texts = [""]
    period = lm.tokenizer(".")["input_ids"]
    for i, (length, count) in enumerate(lengths):
        per_prefix = -(-count // len(CONTEXT_PREFIXES))
        prompts = [lm.tokenizer(p)["input_ids"] for p in CONTEXT_PREFIXES for _ in range(per_prefix)][:count]
        settings = GenerationSettings(max_new_tokens=length, sample=True, seed=seed + i, top_k=5)
        new = generate_ids(lm, prompts, settings, exact_length=True)
        for prompt, sampled in zip(prompts, new):
            ids.append(tuple(prompt + sampled + period))
            texts.append(lm.tokenizer.decode(prompt + sampled + period))
    contexts = Contexts(tuple(ids), tuple(texts))
    memo[key] = contexts
    return contexts


# --- tokens ------------------------------------------------------------------------------------------------


@dataclass
class _Row:
    """One prompt of the value optimisation: its token ids, where delta goes, where the loss is read."""

    ids: list[int]
    key_position: int
    target_positions: list[int]  # positions whose logits predict the target tokens (empty: KL row)
    kl: bool = False


def _subject_tokens(
    lm: LoadedModel, prompt: str, subject: str, context: tuple[int, ...] = ()
) -> tuple[list[int], tuple[int, int]]:
    """Token ids of the context followed by prompt(subject) (after a space when there is a context), and
    the subject's [start, end) token span in the prompt, by the paper's rule (see core.prompts)."""
    lead = " " if context else ""
    text = lead + prompt.replace("{}", subject, 1)
    char_start = len(lead) + prompt.index("{}")
    char_end = char_start + len(subject)
    tok = lm.tokenizer
    if tok.is_fast:
        enc = tok(text, return_offsets_mapping=True)
        ids, ends = list(enc["input_ids"]), [end for _, end in enc["offset_mapping"]]
    else:
        ids = list(tok(text)["input_ids"])
        ends, loc = [], 0
        for i in ids:
            loc += len(tok.decode([i]))
            ends.append(loc)
    start = next((i for i, e in enumerate(ends) if e > char_start), None)
    end = next((i + 1 for i, e in enumerate(ends) if e >= char_end), None)
    if start is None or end is None or end <= start:
        raise UserError(f"cannot map the subject {subject!r} to tokens of {text!r}")
    return list(context) + ids, (len(context) + start, len(context) + end)


def target_ids(lm: LoadedModel, target: str) -> list[int]:
    """Token ids of the target as a continuation (with one leading space, as the paper's code)."""
    ids = lm.tokenizer(" " + target.strip())["input_ids"]
    return list(ids)


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
    new = target_ids(lm, request.target_new)
    ids, _ = _subject_tokens(lm, request.prompt, request.subject)
    answer_ids = generate_ids(lm, [ids], GenerationSettings(max_new_tokens=len(new)), exact_length=True)[0]
    answer = lm.tokenizer.decode(answer_ids[:1])
    if answer_ids == new:
        raise UserError(f"the model already answers {request.target_new.strip()!r} to {request.text!r}")
    true = request.target_true if request.target_true and request.target_true.strip() else answer.strip()
    if true.strip().lower() == request.target_new.strip().lower():
        raise UserError(f"the new target {request.target_new.strip()!r} equals the true answer")
    return replace(request, target_true=true)


# --- the key token -----------------------------------------------------------------------------------------


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


# --- the edit ----------------------------------------------------------------------------------------------


@dataclass
class _Batch:
    """Every row of the value optimisation as one batch from its key token on: the rows' prefixes differ in
    length, so each row has its own start and its prefix keys/values are right-padded (masked out)."""

    hidden: torch.Tensor  # block `layer` output from the key position on, no delta (rows, positions, H), right-padded
    starts: torch.Tensor  # (rows,) key positions
    prefix: PrefixCache | None  # keys/values of positions < each row's key position
    rewrite: torch.Tensor  # (rewrite rows,) row indices
    target_at: torch.Tensor  # (rewrite rows, target tokens) positions (from the key) whose logits predict a target
    targets: torch.Tensor  # (rewrite rows, target tokens) ids
    kl_rows: torch.Tensor  # (KL rows,) row indices
    kl_at: torch.Tensor  # (KL rows,) position (from the key) of the next-token prediction
    init_log_probs: torch.Tensor  # (KL rows, vocab) unedited next-token log-probs


def _padded(tensors: list[torch.Tensor], dim: int) -> torch.Tensor:
    """Stack tensors that differ in size along `dim`, zero-padded at the end of it."""
    width = max(t.shape[dim] for t in tensors)
    padded = []
    for t in tensors:
        pad = list(t.shape)
        pad[dim] = width - t.shape[dim]
        padded.append(torch.cat([t, t.new_zeros(pad)], dim=dim))
    return torch.stack(padded)


@dataclass
class EditTimings:
    stats_seconds: float = 0.0
    key_seconds: float = 0.0
    value_seconds: float = 0.0
    steps: int = 0
    losses: list[float] = field(default_factory=list)
    nll: list[float] = field(default_factory=list)


def compute_edit(
    lm: LoadedModel,
    request: EditRequest,
    hparams: RomeHyperParams | None = None,
    progress: Progress | None = None,
) -> Edit:
    """The rank-one edit that makes the model give `request.target_new` for the subject (weights unchanged;
    apply it with core.edits). Multi-token targets work. Raises UserError for bad input."""
    started = time.perf_counter()
    cpu_start = time.process_time()
    hp = hparams or RomeHyperParams()
    hp.check(lm)
    request = validate_request(lm, request)
    layer = default_layer(lm) if hp.layer is None else hp.layer
    timings = EditTimings()
    need_stats = not statistics_cached(lm, layer, hp.stats_corpus, hp.stats_tokens)
    stats_units = 100 if need_stats else 0  # progress: statistics (when not cached) as 100 units, then steps
    total = stats_units + hp.steps
    tick = (lambda done: progress(done, total)) if progress else (lambda done: None)

    # 1. statistics first (the long part when not cached)
    stats = key_statistics(
        lm,
        layer,
        hp.stats_corpus,
        hp.stats_tokens,
        progress=(lambda done, of: tick(int(stats_units * done / max(of, 1)))) if progress else None,
    )
    timings.stats_seconds = stats.seconds if not stats.cached else 0.0
    edit_start = time.perf_counter()

    # 2. rows: context-prefixed rewrite prompts + the KL prompt
    offset = strongest_key_offset(lm, request, layer) if hp.key_token == "strongest" else 0
    contexts = context_texts(lm, hp.context_lengths, hp.seed)
    new = target_ids(lm, request.target_new)
    rows: list[_Row] = []
    for context in contexts.ids:
        ids, (start, end) = _subject_tokens(lm, request.prompt, request.subject, context)
        prompt_len = len(ids)
        rows.append(
            _Row(ids + new[:-1], max(start, end - 1 - offset), list(range(prompt_len - 1, prompt_len - 1 + len(new))))
        )
    kl_ids, (kl_start, kl_end) = _subject_tokens(lm, "{} is a", request.subject)
    rows.append(_Row(kl_ids, max(kl_start, kl_end - 1 - offset), [len(kl_ids) - 1], kl=True))

    # 3. one clean forward per group of equal-length rows: keys, block outputs at `layer`, keys/values of the
    #    positions before the key; then all rows as one batch from the key on
    mlp_out = lm.arch.layer_name(lm.model, layer, "mlp_out")
    block = lm.arch.layer_name(lm.model, layer, "hidden")
    groups: dict[int, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(len(row.ids), []).append(i)
    hidden: list[torch.Tensor | None] = [None] * len(rows)
    prefix_kv: list[dict | None] = [None] * len(rows)
    keys: list[torch.Tensor | None] = [None] * len(rows)
    outputs: list[torch.Tensor | None] = [None] * len(rows)
    init_log_probs = []
    with torch.no_grad():
        for members in groups.values():
            ids = torch.tensor([rows[i].ids for i in members], device=lm.device)
            with Hooks(lm.model, record=[block, mlp_out], record_inputs=[mlp_out]) as hooks:
                out = lm.model(input_ids=ids, use_cache=True)
            kv = record_kv(cache_of(out))
            for j, i in enumerate(members):
                pos = rows[i].key_position
                hidden[i] = hooks.outputs[block][j, pos:].float()
                prefix_kv[i] = {layer_: (v.keys[j, :, :pos], v.values[j, :, :pos]) for layer_, v in kv.items()}
                keys[i] = hooks.inputs[mlp_out][j, pos].float()
                outputs[i] = hooks.outputs[mlp_out][j, pos].float()
                if rows[i].kl:
                    init_log_probs.append(torch.log_softmax(out.logits[j, -1].float(), dim=-1))
        rewrite = [i for i, r in enumerate(rows) if not r.kl]
        kl_rows = [i for i, r in enumerate(rows) if r.kl]
        width = max(r.key_position for r in rows)
        prefix = None
        if width:
            prefix = PrefixCache(
                {
                    layer_: LayerKV(
                        _padded([kv[layer_][0] for kv in prefix_kv], dim=1),
                        _padded([kv[layer_][1] for kv in prefix_kv], dim=1),
                    )
                    for layer_ in prefix_kv[0]
                }
            )
        batch = _Batch(
            hidden=_padded(hidden, dim=0),
            starts=torch.tensor([r.key_position for r in rows], device=lm.device),
            prefix=prefix,
            rewrite=torch.tensor(rewrite, device=lm.device),
            target_at=torch.tensor(
                [[t - rows[i].key_position for t in rows[i].target_positions] for i in rewrite], device=lm.device
            ),
            targets=torch.tensor([new] * len(rewrite), device=lm.device),
            kl_rows=torch.tensor(kl_rows, device=lm.device, dtype=torch.long),
            kl_at=torch.tensor([len(rows[i].ids) - 1 - rows[i].key_position for i in kl_rows], device=lm.device),
            init_log_probs=torch.stack(init_log_probs),
        )
    key = torch.stack([keys[i] for i in rewrite]).mean(0)
    target_init = outputs[0]  # W's output for the plain prompt (the first context is empty)
    timings.key_seconds = time.perf_counter() - edit_start

    # 4. value: optimise delta at the key token over the layers above
    value_start = time.perf_counter()
    delta = torch.zeros(lm.hidden_size, device=lm.device, requires_grad=True)
    optimiser = torch.optim.Adam([delta], lr=hp.lr)
    max_norm = hp.clamp_norm_factor * target_init.norm()
    for step in range(hp.steps):
        optimiser.zero_grad()
        nll, kl = _losses(lm, batch, delta, layer)
        loss = nll + hp.kl_factor * kl + hp.weight_decay * delta.norm() / target_init.norm() ** 2
        timings.losses.append(round(loss.item(), 5))
        timings.nll.append(round(nll.item(), 5))
        timings.steps = step + 1
        tick(stats_units + step + 1)
        if nll.item() < hp.early_stop_loss or step == hp.steps - 1:
            break
        loss.backward()
        optimiser.step()
        with torch.no_grad():
            if delta.norm() > max_norm:
                delta.mul_(max_norm / delta.norm())
    timings.value_seconds = time.perf_counter() - value_start

    # 5. rank-one update: W' k* + b = W k* + b + delta
    with torch.no_grad():
        delta = delta.detach()
        c = stats.mom2.to(device=lm.device, dtype=torch.float32)
        u = torch.linalg.solve(c, key)
        weight = lm.arch.mlp_out_weight(lm.model, layer).float()
        current = weight @ key
        bias = lm.model.get_submodule(mlp_out).bias
        value = current + (bias.float() if bias is not None else 0) + delta
        v = delta / (u @ key)
    tick(total)
    info = {
        "hparams": json.loads(json.dumps(asdict(hp))),  # JSON types (lists, not tuples): exports round-trip
        "layer": layer,
        "key_offset": offset,
        "target_true": request.target_true,
        "seconds": time.perf_counter() - edit_start,
        "stats_seconds": timings.stats_seconds,
        "stats_cached": stats.cached,
        "key_seconds": timings.key_seconds,
        "value_seconds": timings.value_seconds,
        "steps": timings.steps,
        "losses": timings.losses,
        "nll": timings.nll,
        "groups": len(groups),
        "cpu_seconds": time.process_time() - cpu_start,
        "total_seconds": time.perf_counter() - started,
    }
    return Edit(
        request=request,
        layer=layer,
        u=u.to(lm.dtype),
        v=v.to(lm.dtype),
        key=key.to(lm.dtype),
        value=value.to(lm.dtype),
        model=lm.name,
        info=info,
    )


def _losses(lm: LoadedModel, batch: _Batch, delta: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean NLL of the target over the rewrite rows (each the mean over its tokens) and the summed KL of the
    KL rows, with `delta` added to block `layer`'s output at every row's key token."""
    hidden = batch.hidden.clone()
    hidden[:, 0] = hidden[:, 0] + delta
    states = run_blocks(lm, hidden.to(lm.dtype), first=layer + 1, start_position=batch.starts, prefix=batch.prefix)
    logits = final_logits(lm, states[batch.rewrite[:, None], batch.target_at]).float()
    picked = torch.log_softmax(logits, dim=-1).gather(-1, batch.targets[..., None])[..., 0]
    nll = -picked.mean(dim=1).mean()
    log_probs = torch.log_softmax(final_logits(lm, states[batch.kl_rows, batch.kl_at]).float(), dim=-1)
    kl = torch.nn.functional.kl_div(batch.init_log_probs, log_probs, log_target=True, reduction="sum")
    return nll, kl
