"""``cliplab`` command line: the root finds the command modules and runs the chosen one.

Every module of :mod:`cliplab.cli` that defines ``add_parser(subparsers)`` and
``run(args)`` is a command named after the module, with a one-line ``HELP`` string.  The
root reads ``HELP`` from each module's source without importing it, and imports and
builds the full parser of the chosen command only: ``cliplab --help`` imports no command
module and nothing heavy, and ``cliplab COMMAND`` imports what COMMAND uses.  A new
command is one new module in this folder.

Exit codes: 0 ok, 1 internal error, 2 usage, 3 model load, 4 bad data or a file
that cannot be read or written, 5 unsafe checkpoint refused, 130 interrupted
(see :mod:`cliplab.errors`).
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import logging
import pkgutil
import sys

from ..errors import CliplabError


def commands() -> dict[str, str]:
    """The commands: ``{name: one-line help}``, alphabetical, read without importing them."""
    found = {}
    for info in sorted(pkgutil.iter_modules(sys.modules[__package__].__path__), key=lambda m: m.name):
        if not info.name.startswith("_") and not info.ispkg:
            help_line = _command_help(f"{__package__}.{info.name}")
            if help_line is not None:
                found[info.name] = help_line
    return found


def _command_help(module_name: str) -> str | None:
    """``HELP`` of a command module; None for a module without ``add_parser`` and ``run``."""
    spec = importlib.util.find_spec(module_name)
    source = spec.loader.get_source(module_name) if spec is not None and spec.loader is not None else None
    if source is None:  # installed without sources: import it
        module = importlib.import_module(module_name)
        is_command = callable(getattr(module, "add_parser", None)) and callable(getattr(module, "run", None))
        return module.HELP if is_command else None
    body = ast.parse(source).body
    functions = {node.name for node in body if isinstance(node, ast.FunctionDef)}
    if not {"add_parser", "run"} <= functions:
        return None
    for node in body:
        names = [t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)]
        if isinstance(node, ast.Assign) and "HELP" in names:
            return ast.literal_eval(node.value)
    raise RuntimeError(f"command module {module_name} has no HELP = '<one line>' string")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The root parser, listing every command; only ``command`` gets its full parser.

    Parameters
    ----------
    command : str, optional
        The command whose module is imported and whose ``add_parser`` builds its options
        (``cliplab COMMAND --help`` and parsing need it); the other commands are listed
        with their one-line help only.
    """
    parser = argparse.ArgumentParser(prog="cliplab", description="Toolkit for CLIP-style image-text models.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_line in commands().items():
        if name == command:
            importlib.import_module(f"{__package__}.{name}").add_parser(sub)
        else:
            sub.add_parser(name, help=help_line)
    return parser


def _chosen(argv: list[str]) -> str | None:
    """The command word of ``argv``: its first argument that is not an option of the root
    (the root's options take no values)."""
    for arg in argv:
        if arg == "--":
            return None
        if not arg.startswith("-"):
            return arg
    return None


def _version() -> str:
    from .. import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_chosen(argv))
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
