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
from cliplens._safe import printable
from cliplens._threads import calm_blas_threads
from cliplens.errors import CliplensError

# Modules that add subcommands, in help order. Each has ``register(subparsers)``.
COMMAND_MODULES = ["cliplens.cli.core", "cliplens.cli.evaluate", "cliplens.cli.web", "cliplens.cli.bench", "cliplens.cli.scale",
                   "cliplens.cli.study", "cliplens.cli.study_models", "cliplens.cli.photos"]


class _HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, unless the help already names it or there is none to name."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if ("default" in text or default is None or default is False or default is argparse.SUPPRESS
                or default == [] or not action.option_strings):
            return text
        shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else default
        return f"{text} (default: {shown})"


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

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
    try:
        return _run(argv)
    except BrokenPipeError:  # `cliplens search ... | head -1`: the reader has what it wanted
        return _quiet_broken_pipe()


def _run(argv: list[str] | None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors: already printed
        return int(exc.code or 0)
    logging.basicConfig(level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
                        format="%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:  # file names in warnings: no terminal control characters
        if getattr(handler, "stream", None) is sys.stderr and not isinstance(handler.formatter, _PrintableFormatter):
            handler.setFormatter(_PrintableFormatter(handler.formatter))
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    stdout, sys.stdout = sys.stdout, _PrintableWriter(sys.stdout)  # names, captions, queries in results
    try:
        result = int(args.handler(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler above, not in Python's exit
        return result
    except BrokenPipeError:
        raise
    except CliplensError as exc:
        from cliplens.cli.common import word_error

        print(f"cliplens: error: {printable(word_error(exc))}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("cliplens: interrupted (an interrupted `index` resumes when run again)", file=sys.stderr)
        return 130
    except OSError as exc:  # disk full, permission denied, ...: the user's to fix, so no traceback
        if args.verbose:
            raise
        print(printable(f"cliplens: error: {exc.strerror or exc} ({exc.filename or 'no file'})"), file=sys.stderr)
        return 1
    finally:
        sys.stdout = stdout


class _PrintableWriter:
    """A text stream that escapes control characters (but not newlines and tabs) before they reach the terminal:
    a file named ``\\x1b]0;...`` or a caption with ``\\r`` cannot recolour, retitle or overwrite the output."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(printable(text, keep_newlines=True))
        return len(text)

    def __getattr__(self, name):  # flush, fileno, isatty, encoding...: the real stream's
        return getattr(self._stream, name)


class _PrintableFormatter(logging.Formatter):
    def __init__(self, inner: logging.Formatter | None):
        super().__init__()
        self._inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        return printable(self._inner.format(record), keep_newlines=True)


def _quiet_broken_pipe() -> int:
    """Point stdout at /dev/null so Python's own flush at exit cannot complain about the closed pipe."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout already gone or not a real file: nothing left to protect
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
