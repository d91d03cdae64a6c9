"""Many edits on CUDA, checked on a random-weight model of a real shape: for rome, alphaedit and memit with the
null-space solve (batches of 1), a run over a few known-facts cases in one go, and the same run stopped after
its first edit (time budget 0) and resumed from its checkpoint folder; both must end with the same scores.
Prints each method's scores, edit seconds and whether the two runs agree.

    python bench/gpu_many.py --config DIR --tokenizer DIR [--cases 4] [--device cuda] [--layers N] [--json OUT]

DIR: a model config folder (e.g. the embedded model's config.json) and a tokenizer folder whose ids fit it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from bench.many import ROWS, known_fact_cases
from core.many import edit_many
from core.models import wrap_model

RUNS = ("rome", "alphaedit", "memit-null")  # bench/many.py's rows of the same names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--layers", type=int, default=None, help="fewer layers than the config's (a quick run)")
    parser.add_argument("--json", dest="json_out")
    args = parser.parse_args()
    config = AutoConfig.from_pretrained(args.config)
    if args.layers:
        config.num_hidden_layers = args.layers
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    lm = wrap_model(model, AutoTokenizer.from_pretrained(args.tokenizer), "random-weights", device=args.device)
    cases = known_fact_cases(limit=args.cases)
    runs = {name: dataclasses.replace(ROWS[name], curve_every=2, fluency_tokens=10) for name in RUNS}
    out = {}
    for name, params in runs.items():
        started = time.perf_counter()
        whole, _ = edit_many(lm, cases, params)
        wall = time.perf_counter() - started
        with tempfile.TemporaryDirectory() as folder:
            first, _ = edit_many(lm, cases, dataclasses.replace(params, time_budget=0.0), checkpoint=folder)
            resumed, _ = edit_many(lm, cases, params, checkpoint=folder)
        scores = [(r.efficacy, r.paraphrase, r.neighborhood) for r in (whole, resumed)]
        out[name] = {
            "n": whole.n,
            "stopped_after": first.n,
            "resumed_to": resumed.n,
            "efficacy": whole.efficacy,
            "neighborhood": whole.neighborhood,
            "same_scores": str(scores[0]) == str(scores[1]),  # as text: nan (no paraphrases) equals nan
            "edit_seconds": whole.edit_seconds,
            "wall_seconds": wall,
        }
        print(name, out[name], flush=True)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
