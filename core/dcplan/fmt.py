"""Formatting shared by reports and the CLI: byte sizes and nested key paths."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def fmt_bytes(n: float) -> str:
    """``1536`` -> ``'1.50 KiB'``."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"  # pragma: no cover



def format_path(path: Sequence[Any]) -> str:
    """The user's nested spelling of a flattening path: ``optim['state'][0]['exp_avg']``."""
    if not path:
        return ""
    head, *rest = path
    return str(head) + "".join(f"[{p!r}]" for p in rest)

