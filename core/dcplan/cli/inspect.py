"""``dcplan inspect CKPT [--json]``: what a DCP checkpoint holds, read safely.

Every key with its kind, shape, dtype, bytes and number of chunks; the totals; which
data files hold what; the versions recorded (``Metadata.version`` where present,
``storage_meta``). ``.metadata`` is read with dcplan's allow-list unpickler
(``--trust`` for full pickle, DANGEROUS).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping
from typing import Any

__all__ = ["register", "describe_checkpoint", "read_checkpoint_metadata"]


def read_checkpoint_metadata(path: str, trust: bool = False) -> Any:
    """The checkpoint's ``Metadata``, through :class:`dcplan.FileSystemReader` (one-line errors)."""
    from dcplan.storage.reader import FileSystemReader

    return FileSystemReader(path, trust=trust).read_metadata()


def _nested(metadata: Any, fqn: str) -> str:
    from dcplan.fmt import format_path

    pd = getattr(metadata, "planner_data", None)
    path = pd.get(fqn) if isinstance(pd, Mapping) else None
    return format_path(path) if isinstance(path, (tuple, list)) and path else fqn


def _json_safe(value: Any) -> Any:
    """Tuples and lists as lists, dict keys as strings, anything else JSON lacks as its repr."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    return repr(value)


def _planner_data(pd: Any) -> Any:
    """``planner_data`` as data: ``{key: nested path}`` (torch's flattening mapping), or ``None`` when absent."""
    if pd is None:
        return None
    return _json_safe(pd)


def describe_checkpoint(path: str, metadata: Any, progress: Any = None) -> dict[str, Any]:
    """A JSON-able description of a checkpoint's metadata (what ``dcplan inspect --json`` prints)."""
    import torch

    from dcplan import compat

    storage = getattr(metadata, "storage_data", None) or {}
    stored: dict[str, int] = {}
    files: dict[str, dict[str, Any]] = {}
    for index, info in storage.items():
        fqn = getattr(index, "fqn", str(index))
        rel = getattr(info, "relative_path", None)
        length = int(getattr(info, "length", 0) or 0)
        stored[fqn] = stored.get(fqn, 0) + length
        if rel is not None:
            f = files.setdefault(str(rel), {"items": 0, "bytes": 0, "keys": set(), "needed": 0})
            f["items"] += 1
            f["bytes"] += length
            f["keys"].add(fqn)
            f["needed"] = max(f["needed"], int(getattr(info, "offset", 0) or 0) + length)
    keys = []
    total_bytes = total_stored = n_tensors = n_objects = 0
    fqns = sorted(metadata.state_dict_metadata)
    for fqn in progress(fqns, "keys", total=len(fqns), unit="key") if progress else fqns:
        entry = metadata.state_dict_metadata[fqn]
        row: dict[str, Any] = {"key": fqn, "nested": _nested(metadata, fqn)}
        if isinstance(entry, compat.TensorStorageMetadata):
            shape = [int(s) for s in entry.size]
            dtype = entry.properties.dtype
            numel = 1
            for s in shape:
                numel *= s
            nbytes = numel * torch.empty((), dtype=dtype).element_size()
            row.update(kind="tensor", shape=shape, dtype=str(dtype).removeprefix("torch."),
                       bytes=nbytes, chunks=len(entry.chunks))
            n_tensors += 1
        else:
            nbytes = stored.get(fqn, 0)
            row.update(kind="object", shape=None, dtype=None, bytes=nbytes, chunks=1)
            n_objects += 1
        row["stored_bytes"] = stored.get(fqn, 0)
        total_bytes += nbytes
        total_stored += row["stored_bytes"]
        keys.append(row)
    sm = compat.metadata_storage_meta(metadata)
    storage_meta = None
    if sm is not None:
        storage_meta = {}
        for name in ("checkpoint_id", "save_id", "load_id", "modules"):
            if hasattr(sm, name):
                value = getattr(sm, name)
                storage_meta[name] = os.fspath(value) if isinstance(value, os.PathLike) else value
    pd = getattr(metadata, "planner_data", None)
    return {
        "path": str(path),
        "metadata_only": True,  # the data files are not opened: dcplan verify checks them
        "version": compat.metadata_version(metadata),
        "storage_meta": storage_meta,
        "planner_data": _planner_data(pd),
        "keys": keys,
        "totals": {
            "keys": len(keys),
            "tensors": n_tensors,
            "objects": n_objects,
            "bytes": total_bytes,
            "stored_bytes": total_stored,
            "files": len(files),
        },
        "files": [
            {"file": name, "items": f["items"], "bytes": f["bytes"], "keys": sorted(f["keys"]),
             "on_disk": _file_state(str(path), name, f["needed"])}
            for name, f in sorted(files.items())
        ],
    }


def _file_state(root: str, name: str, needed: int) -> str:
    from dcplan.storage.verify import file_state  # storage (issue 14): stat-only data-file check

    return file_state(root, name, needed)


def _fmt(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)  # pragma: no cover


def _print_text(d: dict[str, Any]) -> None:
    print(f"checkpoint: {d['path']}")
    print(f"format version: {d['version'] or '(not recorded; written by torch < 2.9 or another tool)'}")
    sm = d["storage_meta"]
    if sm:
        print("storage_meta: " + ", ".join(f"{k}={v}" for k, v in sm.items()))
    else:
        print("storage_meta: (not recorded)")
    pd = d["planner_data"]
    shown = "absent" if pd is None else f"{len(pd)} entries" if isinstance(pd, dict) else type(pd).__name__
    print(f"planner_data: {shown} (--json lists them)" if isinstance(pd, dict) else f"planner_data: {shown}")
    rows = d["keys"]
    width = max([len(r["key"]) for r in rows] + [3])
    print(f"{'key':<{width}}  {'kind':<6}  {'shape':<18}  {'dtype':<10}  {'bytes':>10}  chunks")
    for r in rows:
        shape = "x".join(map(str, r["shape"])) if r["shape"] is not None else "-"
        shape = shape or "scalar"
        print(f"{r['key']:<{width}}  {r['kind']:<6}  {shape:<18}  {r['dtype'] or '-':<10}  "
              f"{_fmt(r['bytes']):>10}  {r['chunks']}")
    t = d["totals"]
    print(f"total: {t['keys']} keys ({t['tensors']} tensors, {t['objects']} objects), "
          f"{_fmt(t['bytes'])} of data, {_fmt(t['stored_bytes'])} stored in {t['files']} file(s)")
    for f in d["files"]:
        keys = f["keys"]
        shown = ", ".join(keys[:6]) + (f" ... (+{len(keys) - 6})" if len(keys) > 6 else "")
        state = "" if f.get("on_disk", "ok") == "ok" else f"  [{f['on_disk'].upper()}]"
        print(f"  {f['file']}: {f['items']} item(s), {_fmt(f['bytes'])}: {shown}{state}")
    bad = [f["file"] for f in d["files"] if f.get("on_disk", "ok") != "ok"]
    if bad:
        print(f"WARNING: {len(bad)} data file(s) are missing, empty, truncated or outside the checkpoint: "
              f"{', '.join(bad[:5])}; the data cannot load as it is")
    print(f"note: read metadata only (the data files were not opened); `dcplan verify {d['path']}` "
          "checks that they are all there and match their checksums")


def _cmd_inspect(args: argparse.Namespace) -> int:
    from dcplan.cli.progress import progress

    metadata = read_checkpoint_metadata(args.checkpoint, trust=args.trust)
    d = describe_checkpoint(args.checkpoint, metadata, progress=progress)
    if args.json:
        print(json.dumps(d, indent=2, default=str))
    else:
        _print_text(d)
    return 0


def register(subparsers: Any) -> None:
    """Add ``dcplan inspect`` to the CLI."""
    from dcplan.cli.text import plain

    p = subparsers.add_parser("inspect", help="list a DCP checkpoint's keys, sizes, files and versions (read safely)",
                              description=plain(__doc__))
    p.add_argument("checkpoint", help="the checkpoint directory")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--trust", action="store_true",
                   help="read .metadata with full pickle (DANGEROUS: a crafted checkpoint can run code)")
    p.set_defaults(func=_cmd_inspect)
