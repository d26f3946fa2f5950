"""Help text and errors shared by the subcommands."""

from __future__ import annotations

import argparse
import re
import sys

__all__ = ["plain", "usage_error"]

_ROLE = re.compile(r":[a-z]+:`~?([^`<]+?)(?:\s*<[^>]+>)?`")


def plain(doc: str | None) -> str:
    """A reST docstring as terminal text: no double-backquote literals, no roles, no trailing double colon."""
    text = _ROLE.sub(r"\1", doc or "")
    text = text.replace("``", "")
    text = re.sub(r"\s*::$", ":", text, flags=re.M)
    return text.strip() + "\n"


def usage_error(args: argparse.Namespace, message: str) -> int:
    """Print the subcommand's usage and ``dcplan CMD: error: message`` to stderr; exit status 2."""
    parser = getattr(args, "_parser", None)
    if parser is not None:
        parser.print_usage(sys.stderr)
        print(f"{parser.prog}: error: {message}", file=sys.stderr)
    else:
        print(f"dcplan: error: {message}", file=sys.stderr)
    return 2
