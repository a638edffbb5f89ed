"""The ``lnmeta`` command: a thin layer over ``core`` and ``train``.

Each subcommand lives in its own module of this package and registers itself with
:func:`command`; ``main`` imports every module here, so adding a subcommand is adding a
file::

    from . import command

    @command("tissue", help="Detect tissue and write a mask")
    def tissue(p):                       # p: argparse parser of the subcommand
        p.add_argument("slide")
        def run(args):
            ...                          # return an exit code or None
        return run

Errors derived from :class:`napari_lnmeta.errors.LnmetaError` print one line
(``lnmeta: error: FILE: problem``) and exit with status 2, without a traceback; so do
operating-system errors (``OSError``: a read-only output, ``-o`` under a file, a full
disk), as ``lnmeta: error: PATH: problem (ERRNO)``.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
import warnings
from collections.abc import Callable, Sequence

from ..errors import LnmetaError, LnmetaWarning
from ..io.validate import mpp_arg

_COMMANDS: dict[str, tuple[str, Callable]] = {}


def command(name: str, *, help: str):
    """Register a subcommand: ``setup(parser) -> run(args)``."""

    def deco(setup: Callable[[argparse.ArgumentParser], Callable]) -> Callable:
        _COMMANDS[name] = (help, setup)
        return setup

    return deco


def add_mpp(p: argparse.ArgumentParser) -> None:
    """The shared ``--mpp`` option: level-0 µm/px when the file does not say."""
    p.add_argument("--mpp", type=mpp_arg("--mpp"), default=None,
                   help="level-0 pixel size in µm/px, overriding (or supplying) the file's "
                        "(finite, within [0.01, 1000])")


def add_out(p, help: str, *, required: bool = True, default: str | None = None,
            metavar: str | None = None, old: Sequence[str] = ()) -> argparse.Action:
    """The output option, spelt ``-o/--out`` by every subcommand (``args.out``).

    ``old`` are earlier spellings (``--output``, ``--out-dir``) still accepted for one
    release; they parse into the same option but are left out of ``--help``.
    """
    action = p.add_argument("-o", "--out", *old, dest="out", required=required,
                            default=default, metavar=metavar, help=help)
    action.option_strings = ["-o", "--out"]
    return action


def add_device(p, help: str = "torch device: auto (CUDA when available), cpu, cuda or "
                              "cuda:N") -> argparse.Action:
    """The ``--device`` option, ``auto`` by default in every subcommand."""
    return p.add_argument("--device", default="auto", help=help)


def add_overwrite(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")


def _command_in(argv: Sequence[str]) -> str | None:
    """The subcommand an argument list selects: its first word that is not an option."""
    for a in argv:
        if a == "--":
            return None
        if not a.startswith("-"):
            return a
    return None


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The ``lnmeta`` parser.

    Setting up a subcommand may import what its options need, so with ``argv`` only the
    subcommand it selects is set up; the others keep their name and help (enough for
    ``lnmeta --help`` and for argparse's "invalid choice" message). Without ``argv``
    every subcommand is set up.
    """
    from .. import __version__

    for mod in pkgutil.iter_modules(__path__):
        if not mod.name.startswith("_"):
            importlib.import_module(f"{__name__}.{mod.name}")
    chosen = None if argv is None else _command_in(argv)
    parser = argparse.ArgumentParser(
        prog="lnmeta",
        description="Lymph-node metastasis detection in whole-slide images (napari-lnmeta).")
    parser.add_argument("--version", action="version", version=f"lnmeta {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in sorted(_COMMANDS):
        help_, setup = _COMMANDS[name]
        p = sub.add_parser(name, help=help_, description=help_)
        if argv is None or name == chosen:
            p.set_defaults(_run=setup(p))
    return parser


def os_error_text(e: OSError) -> str:
    """``PATH: problem (ERRNAME)`` in one line, from an operating-system error."""
    import errno as _errno

    name = _errno.errorcode.get(e.errno, "") if e.errno is not None else ""
    problem = e.strerror or str(e) or type(e).__name__
    where = e.filename if e.filename is not None else "(no path)"
    if e.filename2 is not None:
        where = f"{where} -> {e.filename2}"
    return f"{where}: {problem}" + (f" ({name})" if name else "")


def main(argv: Sequence[str] | None = None) -> int:
    from ..progress import TextProgress

    TextProgress.open_line = False
    _shown.clear()
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("always", LnmetaWarning)
        warnings.showwarning = _show_warning
        try:
            args = parser.parse_args(argv)  # option types may refuse a value (pixel sizes)
            code = args._run(args)
        except LnmetaError as e:
            _end_progress_line()
            print(f"lnmeta: error: {e}", file=sys.stderr)
            return 2
        except OSError as e:  # read-only output, -o under a file, disk full, ...
            _end_progress_line()
            print(f"lnmeta: error: {os_error_text(e)}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("lnmeta: interrupted", file=sys.stderr)
            return 130
    return int(code or 0)


def _end_progress_line() -> None:
    """End a progress line left open on stderr, so the next message has its own line."""
    from ..progress import TextProgress

    if TextProgress.open_line:
        print(file=sys.stderr)
        TextProgress.open_line = False


_default_showwarning = warnings.showwarning
_shown: set[str] = set()


def warn(message: str) -> None:
    """The one way a subcommand warns: ``lnmeta: warning: MESSAGE`` on its own stderr line.

    A message is shown once per command, however often it comes up (a slide opened by
    several readers, twice in one run).
    """
    message = str(message)
    if message in _shown:
        return
    _shown.add(message)
    _end_progress_line()
    print(f"lnmeta: warning: {message}", file=sys.stderr)


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """Repairs and gaps the user must know about (:class:`LnmetaWarning`, among them a
    slide without µm/px, ``io.slide.MppWarning``) go through :func:`warn`."""
    if issubclass(category, LnmetaWarning):
        warn(str(message))
    else:
        _default_showwarning(message, category, filename, lineno, file, line)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
