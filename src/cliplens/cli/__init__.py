"""Command line: ``cliplens <command> ...``.

The cli package is the only place that prints results or exits. Each module here registers its subcommands;
library errors (``CliplensError``) become one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from cliplens import __version__
from cliplens._threads import calm_blas_threads
from cliplens.errors import CliplensError

# Modules that add subcommands, in help order. Each has ``register(subparsers)``.
COMMAND_MODULES = ["cliplens.cli.core", "cliplens.cli.evaluate", "cliplens.cli.web", "cliplens.cli.bench", "cliplens.cli.scale",
                   "cliplens.cli.study", "cliplens.cli.study_models"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's usage errors: one line, exit 2, like ours
        self.exit(2, f"cliplens: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cliplens", description="Semantic text-to-image search and evaluation with CLIP.")
    parser.add_argument("--version", action="version", version=f"cliplens {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    calm_blas_threads()  # before anything imports numpy (see cliplens._threads)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors: already printed
        return int(exc.code or 0)
    logging.basicConfig(level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
                        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except CliplensError as exc:
        print(f"cliplens: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("cliplens: interrupted (an interrupted `index` resumes when run again)", file=sys.stderr)
        return 130
    except OSError as exc:  # disk full, permission denied, ...: the user's to fix, so no traceback
        if args.verbose:
            raise
        print(f"cliplens: error: {exc.strerror or exc} ({exc.filename or 'no file'})", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
