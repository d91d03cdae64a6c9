"""Command-line commands: one module each, every module exposes `register(parser, add_common_options)`, which
adds the command's options to its parser and sets `run=handler`.

`COMMANDS` names each command's module and its one-line help, so that `python -m core --help` lists them all
without importing any (core/__main__.py makes every command's parser from here and imports only the module of
the command asked for: torch and transformers load in seconds, the list at once). The handler takes the parsed
arguments, prints a short human summary and returns the machine-readable result (a dict) that `--json OUT` writes.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    module: str
    help: str


COMMANDS = {
    "trace": Command("core.commands.trace", "causal trace of a prompt (hidden / mlp / attn)"),
    "aie": Command("core.commands.aie", "average indirect effect over known facts, by token category"),
    "facts": Command("core.commands.facts", "check which facts the model knows (predicts the attribute)"),
    "edit": Command("core.commands.edit", "edit one fact with ROME and show before/after"),
    "evaluate": Command("core.commands.evaluate", "CounterFact metrics of an editing method"),
    "sentiment": Command("core.commands.sentiment", "sentiment: the 'I am feeling' proxy, a probe, the trace"),
    "apply": Command("core.commands.apply", "apply exported edits to a model and save the edited model"),
    "edit-many": Command("core.commands.many", "many edits on one model: sequential or one batch, measured"),
    "sweep": Command("core.commands.sweep", "layer sweep: the same ROME edit at each layer, with the trace beside it"),
}
