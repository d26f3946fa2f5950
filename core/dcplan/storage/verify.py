"""``dcplan verify PATH``: is every byte the checkpoint's ``.metadata`` names there, and intact?

Checks, in order, for every storage entry of ``.metadata`` (read with the safe reader):

1. its path stays inside the checkpoint directory (no ``..``, absolute path or symlink out);
2. the data file exists;
3. the item's bytes ``offset .. offset+length`` lie inside the file (else empty/truncated);
4. the bytes match the checksum recorded by :class:`dcplan.FileSystemWriter` (when the
   checkpoint has checksums; torch's own writer records none, and then only 1-3 run);

and that every chunk in the metadata has a storage entry. Files that belong to no
committed checkpoint (an interrupted or replaced save) are listed as leftovers: they do
not make the checkpoint bad, and the next ``dcplan.save`` to the same path removes them.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Iterator
from typing import Any

from dcplan.load.safe import CheckpointPathError, CorruptCheckpointError
from dcplan.storage.checksum import ALGORITHM, BLOCK, Checksums, digest_bytes, sidecar_name
from dcplan.storage.reader import FileSystemReader, confined_path, load_checksums
from dcplan.storage.writer import leftovers

__all__ = ["Problem", "VerifyReport", "file_state", "verify_checkpoint"]

#: a progress bar is shown (on a terminal) when at least this many bytes are hashed
PROGRESS_BYTES = 256 << 20
_READ_BLOCK = BLOCK  # hashed right after it is read, while in the CPU cache


@dataclasses.dataclass(frozen=True)
class Problem:
    """One thing wrong: ``kind`` is path, missing, empty, truncated, checksum, checksums or coverage."""

    kind: str
    file: str | None
    item: str | None
    detail: str


@dataclasses.dataclass
class VerifyReport:
    """What :func:`verify_checkpoint` found."""

    path: str
    files: int = 0
    items: int = 0
    bytes: int = 0
    checksums: str = "absent"  #: "verified", "absent" (none recorded), "skipped" or "missing"
    checked_items: int = 0
    problems: list[Problem] = dataclasses.field(default_factory=list)
    leftovers: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["ok"] = self.ok
        out["algorithm"] = ALGORITHM if self.checksums == "verified" else None
        return out


def _item(index: Any) -> str:
    offset = getattr(index, "offset", None)
    return f"{index.fqn}" + (f" (chunk at {list(offset)})" if offset is not None and len(offset) else "")


def _coverage(metadata: Any, storage: dict[Any, Any]) -> Iterator[Problem]:
    from dcplan import compat

    names = {(getattr(i, "fqn", None), tuple(getattr(i, "offset", None) or ())) for i in storage}
    for fqn, entry in sorted(metadata.state_dict_metadata.items()):
        chunks = entry.chunks if isinstance(entry, compat.TensorStorageMetadata) else [None]
        for chunk in chunks:
            key = (fqn, tuple(chunk.offsets) if chunk is not None else ())
            if key not in names:
                where = f" chunk at {list(key[1])}" if chunk is not None else ""
                yield Problem("coverage", None, fqn, f"{fqn}{where} is in .metadata but no storage entry holds it")


def file_state(root: str, relative_path: str, needed: int) -> str:
    """A data file's state from ``stat`` alone: ``ok``, ``missing``, ``empty``, ``truncated`` or ``outside``.

    ``needed`` is the largest ``offset + length`` that ``.metadata`` puts in it. Cheap (no data
    read); ``dcplan inspect`` shows it, :func:`verify_checkpoint` checks far more.
    """
    try:
        full = confined_path(root, relative_path)
    except CheckpointPathError:
        return "outside"
    try:
        size = os.stat(full).st_size
    except OSError:
        return "missing"
    if size < needed:
        return "empty" if size == 0 else "truncated"
    return "ok"


def verify_checkpoint(path: str | os.PathLike[str], *, checksums: bool = True, trust: bool = False,
                      progress: bool | None = None) -> VerifyReport:
    """Check the checkpoint at ``path`` (see the module docstring).

    :param checksums: hash the data and compare with the recorded checksums.
    :param trust: read ``.metadata`` with full pickle (DANGEROUS).
    :param progress: show a progress bar (``None``: on a terminal, for large checkpoints).
    :raises CheckpointReadError: ``.metadata`` itself cannot be read.
    """
    root = os.fspath(path)
    metadata = FileSystemReader(root, trust=trust).read_metadata()
    storage = dict(getattr(metadata, "storage_data", None) or {})
    report = VerifyReport(root, items=len(storage))
    report.problems.extend(_coverage(metadata, storage))
    sums: Checksums | None = None
    if checksums:
        try:
            sums = load_checksums(root, metadata)
        except CorruptCheckpointError as exc:
            report.checksums = "missing"
            report.problems.append(Problem("checksums", None, None, str(exc)))
        else:
            report.checksums = "absent" if sums is None else "verified"
    else:
        report.checksums = "skipped"
    per_file: dict[str, list[tuple[Any, Any]]] = {}
    for index, info in storage.items():
        per_file.setdefault(str(getattr(info, "relative_path", "")), []).append((index, info))
    report.files = len(per_file)
    report.bytes = sum(int(info.length) for info in storage.values())
    bar = _progress_bar(report.bytes if sums is not None else 0, progress)
    try:
        for rel, entries in sorted(per_file.items()):
            report.problems.extend(_check_file(root, rel, entries, sums, report, bar))
    finally:
        if bar is not None:
            bar.close()
    save_id = getattr(getattr(metadata, "storage_meta", None), "save_id", None)
    keep = sidecar_name(save_id) if isinstance(save_id, str) else None
    report.leftovers = leftovers(root, storage.values(), keep=keep)
    return report


def _check_file(root: str, rel: str, entries: list[tuple[Any, Any]], sums: Checksums | None,
                report: VerifyReport, bar: Any) -> Iterator[Problem]:
    try:
        full = confined_path(root, rel)
    except CheckpointPathError as exc:
        yield Problem("path", rel, _item(entries[0][0]), str(exc))
        return
    try:
        fh = open(full, "rb")
    except FileNotFoundError:
        yield Problem("missing", rel, _item(entries[0][0]),
                      f"data file {rel} is missing; .metadata names it for {len(entries)} item(s)")
        return
    except OSError as exc:
        yield Problem("missing", rel, None, f"cannot open data file {rel}: {exc.strerror or exc}")
        return
    with fh:
        size = os.fstat(fh.fileno()).st_size
        for index, info in sorted(entries, key=lambda e: int(e[1].offset)):
            offset, length = int(info.offset), int(info.length)
            if offset + length > size:
                kind = "empty" if size == 0 else "truncated"
                yield Problem(kind, rel, _item(index),
                              f"data file {rel} is {kind} ({size} bytes) but {_item(index)} needs bytes "
                              f"{offset}..{offset + length}")
                continue
            if sums is None:
                continue
            problem = _check_item(fh, rel, index, offset, length, sums, bar)
            report.checked_items += 1
            if problem is not None:
                yield problem


def _check_item(fh: Any, rel: str, index: Any, offset: int, length: int, sums: Checksums, bar: Any) -> Problem | None:
    recorded = sums.lookup(rel, offset)
    if recorded is None or recorded[0] != length:
        return Problem("checksum", rel, _item(index),
                       f"no checksum recorded for {_item(index)} at {rel} offset {offset} ({length} bytes)")
    import xxhash

    h = xxhash.xxh3_64()
    fh.seek(offset)
    left = length
    while left:
        block = fh.read(min(left, _READ_BLOCK))
        if not block:
            break
        h.update(block)
        left -= len(block)
        if bar is not None:
            bar.update(len(block))
    got = h.hexdigest() if length else digest_bytes(b"")
    if got != recorded[1]:
        return Problem("checksum", rel, _item(index),
                       f"checksum mismatch in {rel} at offset {offset} ({length} bytes, {_item(index)}): "
                       f"expected {ALGORITHM} {recorded[1]}, got {got}")
    return None


def _progress_bar(total: int, progress: bool | None) -> Any:
    if progress is None:
        progress = total >= PROGRESS_BYTES and sys.stderr.isatty()
    if not progress or total <= 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="verifying", file=sys.stderr)
