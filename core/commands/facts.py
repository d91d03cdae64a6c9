"""`python -m core facts`: which facts of a file the model predicts; optionally keep only those."""

from __future__ import annotations

import argparse
from collections import Counter

from core.commands.common import load, output_file
from core.commands.progress import progress_bar
from core.facts import DEFAULT_FACTS, known_facts, load_facts, save_facts


def register(parser: argparse.ArgumentParser, add_common_options) -> None:
    parser.add_argument("--facts", default=str(DEFAULT_FACTS))
    parser.add_argument("--keep", metavar="OUT", type=output_file, help="write the known facts to this JSON file")
    add_common_options(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> dict:
    facts = load_facts(args.facts)
    lm = load(args)
    with progress_bar("facts checked") as progress:
        predictions = known_facts(lm, facts, progress)
    known = [p for p in predictions if p.known]
    print(f"{lm.name} knows {len(known)} of {len(facts)} facts")
    by_relation = Counter(p.fact.relation for p in known)
    totals = Counter(f.relation for f in facts)
    for relation in sorted(totals):
        print(f"  {relation or '(no relation)'}: {by_relation[relation]}/{totals[relation]}")
    if args.keep:
        save_facts(args.keep, [p.fact for p in known])
    return {
        "model": lm.name,
        "n": len(facts),
        "known": len(known),
        "by_relation": {r: [by_relation[r], totals[r]] for r in sorted(totals)},
        "predictions": [
            {
                "subject": p.fact.subject,
                "prompt": p.fact.prompt,
                "attribute": p.fact.attribute,
                "answer": p.answer,
                "probability": p.probability,
                "known": p.known,
            }
            for p in predictions
        ],
    }
