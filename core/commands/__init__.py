"""Command-line commands: one module each, every module exposes `register(subparsers)`.

A module's parser sets `run=handler`; the handler takes the parsed arguments, prints a short human
summary and returns the machine-readable result (a dict) that `--json OUT` writes.
"""

COMMAND_MODULES = [
    "core.commands.trace",
    "core.commands.aie",
    "core.commands.facts",
    "core.commands.edit",
    "core.commands.evaluate",
    "core.commands.sentiment",
    "core.commands.apply",
    "core.commands.many",
    "core.commands.sweep",
]
