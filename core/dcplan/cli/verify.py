"""``dcplan verify CKPT [--json] [--no-checksums]``: check that a checkpoint's data is all there and intact.

Exit status: 0 when nothing is wrong, 1 when a problem was found (each is listed), 2 when
``.metadata`` itself cannot be read. See :mod:`dcplan.storage.verify`.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

__all__ = ["register"]


def _fmt(n: int) -> str:
    from dcplan.fmt import fmt_bytes

    return str(fmt_bytes(n))


def _print_text(r: Any) -> None:
    print(f"checkpoint: {r.path}")
    print(f"data: {r.items} item(s), {_fmt(r.bytes)} in {r.files} file(s)")
    checks = {
        "verified": f"{r.checked_items} item(s) hashed and compared (xxh3_64)",
        "absent": "none recorded (written without dcplan's writer): files and sizes checked only",
        "skipped": "not checked (--no-checksums): files and sizes checked only",
        "missing": "the checksum file is missing",
    }
    print(f"checksums: {checks[r.checksums]}")
    if r.leftovers:
        print(f"leftovers: {len(r.leftovers)} file(s) from an interrupted or replaced save "
              f"(not part of the checkpoint; the next dcplan save removes them): {', '.join(r.leftovers[:5])}"
              + (" ..." if len(r.leftovers) > 5 else ""))
    if r.ok:
        print("OK: every item is present" + (" and matches its checksum" if r.checksums == "verified" else ""))
        return
    print(f"FAILED: {len(r.problems)} problem(s)")
    for p in r.problems[:50]:
        print(f"  {p.kind}: {p.detail}")
    if len(r.problems) > 50:
        print(f"  ... and {len(r.problems) - 50} more (--json lists all)")


def _cmd_verify(args: argparse.Namespace) -> int:
    from dcplan.storage.verify import verify_checkpoint

    progress = None if args.progress is None else args.progress
    report = verify_checkpoint(args.checkpoint, checksums=not args.no_checksums, trust=args.trust,
                               progress=False if args.json and progress is None else progress)
    if args.json:
        print(json.dumps(report.to_json(), indent=2, default=str))
    else:
        _print_text(report)
    return 0 if report.ok else 1


def register(subparsers: Any) -> None:
    """Add ``dcplan verify`` to the CLI."""
    p = subparsers.add_parser(
        "verify", help="check that every data file and item of a checkpoint is present and matches its checksum")
    p.add_argument("checkpoint", help="the checkpoint directory")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--no-checksums", action="store_true", help="check files and sizes only, do not hash the data")
    p.add_argument("--progress", dest="progress", action="store_true", default=None,
                   help="always show a progress bar (default: on a terminal, for large checkpoints)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="never show a progress bar")
    p.add_argument("--trust", action="store_true",
                   help="read .metadata with full pickle (DANGEROUS: a crafted checkpoint can run code)")
    p.set_defaults(func=_cmd_verify)
