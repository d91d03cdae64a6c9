"""Running part of a model (core/forward.py): blocks on a stretch of positions with recorded keys/values of the
earlier positions give what the full forward gives, also for rows of different prefix lengths in one batch."""

from __future__ import annotations

import torch

from core.forward import LayerKV, PrefixCache, final_logits, record_kv, run_blocks, slice_prefix
from core.hooks import Hooks, stop_after

PROMPTS = ["The Eiffel Tower is located in the city of", "Tourists say that the Colosseum stands in the city of"]


def _full_run(lm, ids: list[int], layer: int):
    """Block `layer`'s output, the keys/values and the last logits of a plain full forward."""
    block = lm.arch.layer_name(lm.model, layer)
    with torch.no_grad(), Hooks(lm.model, record=[block]) as hooks:
        out = lm.model(input_ids=torch.tensor([ids]), use_cache=True)
    cache = getattr(out, "cache", None) or out.past_key_values
    return hooks.outputs[block], record_kv(cache), out.logits[0, -1]


def test_run_blocks_from_a_position_equals_the_full_forward(tiny):
    ids = tiny.tokenizer(PROMPTS[0])["input_ids"]
    hidden, kv, logits = _full_run(tiny, ids, layer=1)
    start = 4
    with torch.no_grad():
        states = run_blocks(
            tiny, hidden[:, start:], first=2, start_position=start, prefix=PrefixCache(slice_prefix(kv, start))
        )
        again = final_logits(tiny, states[:, -1])[0]
    torch.testing.assert_close(again, logits, atol=1e-5, rtol=1e-5)


def test_rows_with_different_prefix_lengths_in_one_padded_batch(tiny):
    """Two prompts, each resumed from its own position, right-padded into one batch: every real position's
    result equals the prompt's own full forward (the padding is masked out)."""
    layer = 1
    runs, starts, suffixes = [], [], []
    for prompt, start in zip(PROMPTS, (3, 6)):
        ids = tiny.tokenizer(prompt)["input_ids"]
        hidden, kv, logits = _full_run(tiny, ids, layer)
        runs.append((kv, logits, len(ids) - start))
        starts.append(start)
        suffixes.append(hidden[0, start:])
    width, length = max(starts), max(s.shape[0] for s in suffixes)
    hidden = torch.stack([torch.cat([s, s.new_zeros(length - s.shape[0], s.shape[1])]) for s in suffixes])

    def padded(tensors):
        return torch.cat(
            [torch.cat([t, t.new_zeros(*t.shape[:2], width - t.shape[2], t.shape[3])], dim=2) for t in tensors]
        )

    prefix = PrefixCache(
        {
            layer_: LayerKV(
                padded([kv[layer_].keys[:, :, :start] for (kv, _, _), start in zip(runs, starts)]),
                padded([kv[layer_].values[:, :, :start] for (kv, _, _), start in zip(runs, starts)]),
            )
            for layer_ in runs[0][0]
        }
    )
    with torch.no_grad():
        states = run_blocks(tiny, hidden, first=layer + 1, start_position=torch.tensor(starts), prefix=prefix)
    for row, (_, logits, real) in enumerate(runs):
        again = final_logits(tiny, states[row, real - 1])
        torch.testing.assert_close(again, logits, atol=1e-5, rtol=1e-5)


def test_stop_after_ends_the_forward_once_the_module_has_run(tiny):
    """`stop_after` (core.hooks): the recorded output equals the full forward's, no block above runs, and the
    hooks are gone afterwards (the next forward runs every block)."""
    ids = torch.tensor([tiny.tokenizer(PROMPTS[0])["input_ids"]])
    block, above = (tiny.arch.layer_name(tiny.model, layer) for layer in (1, 2))
    full, _, _ = _full_run(tiny, ids[0].tolist(), layer=1)
    ran = []
    with Hooks(tiny.model, {above: lambda output, name: ran.append(name)}):
        with torch.no_grad(), Hooks(tiny.model, record=[block]) as hooks, stop_after(tiny.model, block):
            tiny.model(input_ids=ids)
        assert ran == [] and torch.equal(hooks.outputs[block], full)
        with torch.no_grad():
            tiny.model(input_ids=ids)
        assert ran == [above]
