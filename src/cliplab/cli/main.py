"""``cliplab`` command line: the root only registers the command modules.

Exit codes: 0 ok, 1 internal error, 2 usage, 3 model load, 4 bad data or a file
that cannot be read or written, 5 unsafe checkpoint refused, 130 interrupted
(see :mod:`cliplab.errors`).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from ..errors import CliplabError

COMMANDS = ["classify", "embed", "models", "convert", "demo", "shapes", "train", "eval", "report", "adapt",
            "interpolate"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cliplab", description="Toolkit for CLIP-style image-text models.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"cliplab.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"cliplab.cli.{name}":
                continue  # command not shipped in this build
            raise
        module.add_parser(sub)
    return parser


def _version() -> str:
    from .. import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "run", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.run(args) or 0)
    except CliplabError as e:
        print(f"cliplab: error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # unwritable output, full disk, a file where a folder should be...
        print(f"cliplab: error: {_os_error(e)}", file=sys.stderr)
        return 4
    except KeyboardInterrupt:
        print("cliplab: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


def _os_error(e: OSError) -> str:
    """One line for an OSError, naming the path the user gave (a rename's target, not its temp file)."""
    path = getattr(e, "filename2", None) or getattr(e, "filename", None)
    if path is None:
        return str(e.strerror or e)
    if isinstance(e, (FileExistsError, NotADirectoryError)):
        return f"{path}: a file is in the way where a folder is needed (it or one of its parents is a file)"
    if isinstance(e, IsADirectoryError):
        return f"{path}: is a folder; give a file name"
    return f"{e.strerror or e}: {path}"


if __name__ == "__main__":
    sys.exit(main())
