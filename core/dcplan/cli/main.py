"""The ``dcplan`` command line: builds the parser from plugins and dispatches.

Every subcommand, dcplan's own included, is added through the
``dcplan_register_commands`` hook: dcplan's own commands live in
:mod:`dcplan.cli.commands`; plugins add theirs from the ``dcplan.cli`` entry-point
group. Building the parser imports neither torch nor the planners, so
``dcplan --help`` is fast; each command imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["main", "build_parser", "version_text"]

#: Commands that in-repo plugins provide: named in the error when the plugin is absent.
PLUGIN_COMMANDS = {"convert": ("dcplan-empty-load", "plugins/empty_load")}


class _Subparsers:
    """The sub-parsers action as handed to each plugin: duplicate command names are an error."""

    def __init__(self, action: Any, owners: dict[str, str]) -> None:
        self._action = action
        self._owners = owners
        self.plugin = "?"

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        from dcplan.errors import PluginError

        if name in self._owners:
            raise PluginError(
                f"the dcplan command {name!r} is added twice: by plugin {self._owners[name]!r} and by "
                f"plugin {self.plugin!r}; uninstall or disable one (DCPLAN_DISABLE_PLUGINS)"
            )
        self._owners[name] = self.plugin
        parser: argparse.ArgumentParser = self._action.add_parser(name, **kwargs)
        parser.set_defaults(_parser=parser)
        return parser

    def __getattr__(self, name: str) -> Any:
        return getattr(self._action, name)


def cli_plugin_manager() -> Any:
    """The plugin manager of the command line: dcplan's commands, then the ``dcplan.cli`` entry points."""
    from dcplan.manager import CLI_ENTRY_POINT_GROUP, DcplanPluginManager

    return DcplanPluginManager(group=CLI_ENTRY_POINT_GROUP, builtins=("dcplan.cli.commands",))


def build_parser(pm: Any = None) -> argparse.ArgumentParser:
    """The ``dcplan`` parser with every command the core and the installed plugins register."""
    return build_parser_and_owners(pm)[0]


def build_parser_and_owners(pm: Any = None) -> tuple[argparse.ArgumentParser, dict[str, str]]:
    """:func:`build_parser`, and which plugin added each command."""
    pm = cli_plugin_manager() if pm is None else pm
    parser = argparse.ArgumentParser(prog="dcplan", description="Pluggable planning for torch.distributed.checkpoint")
    parser.add_argument("-V", "--version", action="store_true",
                        help="show dcplan's version, torch's and the installed plugins, and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    owners: dict[str, str] = {}
    proxy = _Subparsers(sub, owners)
    for impl in pm.pm.hook.dcplan_register_commands.get_hookimpls():
        proxy.plugin = impl.plugin_name
        impl.function(subparsers=proxy)
    return parser, owners


def version_text() -> str:
    """``dcplan --version``: dcplan, python and torch versions, and the installed plugins (no torch import)."""
    import importlib.metadata as md

    import dcplan

    def ver(dist: str) -> str:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return "not installed"

    plugins = set()
    for dist in md.distributions():
        try:
            if any(ep.group in ("dcplan", "dcplan.cli") for ep in dist.entry_points):
                plugins.add(f"{dist.metadata['Name']}-{dist.version}")
        except Exception:  # noqa: BLE001 - a half-installed distribution
            continue
    where = os.path.dirname(os.path.abspath(dcplan.__file__))
    lines = [
        f"dcplan {dcplan.__version__} at {where}",
        f"python {sys.version.split()[0]}, torch {ver('torch')}, pluggy {ver('pluggy')}",
        "plugins: " + (", ".join(sorted(plugins)) or "none"),
    ]
    for var in ("DCPLAN_LOAD_PLUGINS", "DCPLAN_DISABLE_PLUGINS", "DCPLAN_PLUGINS"):
        if var in os.environ:
            lines.append(f"{var}={os.environ[var]}")
    return "\n".join(lines)


def _missing_command(argv: Sequence[str], parser: argparse.ArgumentParser) -> int | None:
    """A command an absent plugin would provide: say which distribution to install."""
    words = [a for a in argv if not a.startswith("-")]
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if words and words[0] in PLUGIN_COMMANDS and words[0] not in sub.choices:
        dist, path = PLUGIN_COMMANDS[words[0]]
        print(f"dcplan: error: the command {words[0]!r} is provided by the plugin distribution {dist}, which is "
              f"not installed or is disabled (install it from a clone of dcplan: pip install ./{path})",
              file=sys.stderr)
        return 2
    return None


def _format_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                    line: str | None = None) -> str:
    """Warnings as one line; the file only when it is not dcplan's own (a plugin's, say)."""
    core = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    where = "" if os.path.abspath(filename).startswith(core) else f"{filename}:{lineno}: "
    return f"{where}dcplan: warning: {message}\n"


def _run(argv: Sequence[str]) -> int:
    import warnings

    from dcplan.errors import DcplanError

    warnings.formatwarning = _format_warning

    try:
        parser = build_parser()
    except DcplanError as exc:
        print(f"dcplan: error: {exc}", file=sys.stderr)
        return 2
    missing = _missing_command(argv, parser)
    if missing is not None:
        return missing
    args, extra = parser.parse_known_args(argv)
    if args.version:
        print(version_text())
        return 0
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    if extra:  # the subcommand's usage, not the top-level one
        args._parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args.func(args) or 0)
    except DcplanError as exc:
        print(f"dcplan: error: {exc}", file=sys.stderr)
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``dcplan``; returns the exit status. Quiet when its output pipe closes early (``| head``)."""
    try:
        rc = _run(sys.argv[1:] if argv is None else argv)
        sys.stdout.flush()
        return rc
    except BrokenPipeError:
        # the reader went away (``dcplan config | head -3``): no traceback, and no second
        # error when Python flushes stdout at exit
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:  # pragma: no cover
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
