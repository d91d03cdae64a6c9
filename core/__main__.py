"""`python -m core <command> ...`: the command line (see `python -m core --help`)."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from core.commands import COMMANDS
from core.errors import UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, no usage dump
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser, with every command listed and only the command `argv` asks for (its first word) built in
    full: its module, and with it torch and transformers, is imported; the others are names and help only,
    so `--help` and a mistyped command answer at once."""
    parser = _Parser(prog="python -m core", description="ROME Studio: locate and edit facts in language models")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    asked = argv[0] if argv else None
    for name, command in COMMANDS.items():
        command_parser = sub.add_parser(name, help=command.help)
        if name == asked:
            from core.commands.common import add_common_options

            importlib.import_module(command.module).register(command_parser, add_common_options)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    from transformers.utils import logging as hf_logging

    from core.commands.common import write_json

    hf_logging.disable_progress_bar()  # our own bars say what is going on
    hf_logging.set_verbosity_error()
    try:
        result = args.run(args)
        if getattr(args, "json_out", None) and result is not None:
            write_json(args.json_out, result)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # never a traceback for the user; ROME_STUDIO_DEBUG=1 shows it
        if os.environ.get("ROME_STUDIO_DEBUG"):
            raise
        print(
            f"error: unexpected {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}", file=sys.stderr
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
