"""Checksums of stored items, computed while they are written, kept in a sidecar file.

Algorithm: xxHash XXH3-64 (the ``xxhash`` package). It hashes at memory speed (~10 GB/s
per core here, far above what ``torch.save`` writes), it is well kept (the reference C
library, used by zstd, rsync and Linux), and its incremental API hashes the stream as it
is written, so no byte is read twice. It detects corruption (bit flips, truncation, a
file swapped for another); it is not a cryptographic signature.

The sidecar ``PATH/.<save_id>.checksums.json`` is written by the coordinator before
``.metadata`` is committed; ``.metadata``'s ``storage_meta.save_id`` names it, so a
``.metadata`` and its checksums are switched together by one atomic rename. torch's own
reader never opens it, so checkpoints stay readable by stock ``dcp.load``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

import xxhash

__all__ = [
    "ALGORITHM",
    "BLOCK",
    "SAVE_ID_PREFIX",
    "HashingStream",
    "Checksums",
    "digest_bytes",
    "has_checksums",
    "new_save_id",
    "read_sidecar",
    "sidecar_name",
    "write_sidecar",
]

ALGORITHM = "xxh3_64"
#: bytes hashed at a time, right after they are written or read (they are still in the CPU cache)
BLOCK = 256 << 10
#: ``storage_meta.save_id`` of every checkpoint dcplan's writer commits starts with this.
SAVE_ID_PREFIX = "dcplan-"
_FORMAT = "dcplan-checksums"
_SIDECAR_RE = re.compile(r"^\.dcplan-[0-9a-f]{32}\.checksums\.json$")


_SAVE_ID_RE = re.compile(r"^dcplan-[0-9a-f]{32}$")


def new_save_id(checksums: bool = True) -> str:
    """A fresh save id: ``dcplan-`` and 32 hex digits, ``dcplan-unchecked-...`` for a save without checksums.

    Its last 32 hex digits name the save's data files; a loader expects a checksum file
    exactly when :func:`has_checksums` says so.
    """
    return (SAVE_ID_PREFIX if checksums else SAVE_ID_PREFIX + "unchecked-") + os.urandom(16).hex()


def has_checksums(save_id: object) -> bool:
    """Whether a checkpoint whose ``storage_meta.save_id`` is ``save_id`` was saved with checksums."""
    return isinstance(save_id, str) and bool(_SAVE_ID_RE.match(save_id))


def save_token(save_id: str) -> str:
    """The part of a save id that goes into its data file names (16 hex digits)."""
    return save_id[-32:][:16]


def sidecar_name(save_id: str) -> str:
    """The sidecar's file name for a save id."""
    return f".{save_id}.checksums.json"


def is_sidecar_name(name: str) -> bool:
    return bool(_SIDECAR_RE.match(name))


def _hasher() -> Any:
    return xxhash.xxh3_64()


def digest_bytes(data: Any) -> str:
    """The hex checksum of a bytes-like object."""
    return xxhash.xxh3_64_hexdigest(data)


class HashingStream:
    """A write stream that hashes what goes through it, one segment per ``tell()``.

    torch's writer calls ``tell()`` before and after each item, so each item normally
    is one segment; :meth:`segment` finds it. Anything else (a ``seek``, an item split
    over several segments) is found missing and the writer hashes those bytes from the
    file instead: correctness never depends on how torch calls the stream.
    """

    def __init__(self, raw: Any) -> None:
        self._raw = raw
        self._pos = raw.tell()
        self._start = self._pos
        self._h = _hasher()
        self.segments: dict[tuple[int, int], str] = {}
        self.broken = False

    def write(self, data: Any) -> int:
        """Write ``data`` in blocks of :data:`BLOCK` bytes, each hashed right after it is written
        (while it is still in the CPU cache)."""
        view = memoryview(data).cast("B")
        total = 0
        while total < len(view):
            block = view[total : total + BLOCK]
            n = self._raw.write(block)
            if n is None:  # pragma: no cover - a raw non-blocking stream
                n = len(block)
            self._h.update(block[:n] if n != len(block) else block)
            self._pos += n
            total += n
            if n < len(block):  # pragma: no cover - a short write: the caller retries the rest
                break
        return total

    def _close_segment(self) -> None:
        if self._pos > self._start:
            self.segments[(self._start, self._pos)] = self._h.hexdigest()
            self._h = _hasher()
        self._start = self._pos

    def tell(self) -> int:
        self._close_segment()
        return self._pos

    def seek(self, *args: Any) -> int:
        self.broken = True
        pos = self._raw.seek(*args)
        self._pos = self._start = pos
        self._h = _hasher()
        return int(pos)

    def finish(self) -> dict[tuple[int, int], str]:
        self._close_segment()
        return {} if self.broken else self.segments

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def readable(self) -> bool:
        return False

    def flush(self) -> None:
        self._raw.flush()

    def fileno(self) -> int:
        return int(self._raw.fileno())

    def close(self) -> None:
        self._raw.close()

    @property
    def closed(self) -> bool:
        return bool(self._raw.closed)

    def __enter__(self) -> HashingStream:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Checksums:
    """The checksums of one checkpoint: ``(relative_path, offset) -> (length, digest)``.

    :ivar save_id: the save they belong to.
    :ivar sizes: ``relative_path -> file size`` when written.
    """

    def __init__(self, save_id: str, items: Mapping[tuple[str, int], tuple[int, str]],
                 sizes: Mapping[str, int] | None = None) -> None:
        self.save_id = save_id
        self.items = dict(items)
        self.sizes = dict(sizes or {})

    def lookup(self, relative_path: str, offset: int) -> tuple[int, str] | None:
        return self.items.get((relative_path, int(offset)))

    def to_json(self) -> dict[str, Any]:
        files: dict[str, dict[str, Any]] = {}
        for (rel, off), (length, digest) in sorted(self.items.items()):
            f = files.setdefault(rel, {"size": self.sizes.get(rel), "items": []})
            f["items"].append([off, length, digest])
        return {"format": _FORMAT, "version": 1, "algorithm": ALGORITHM, "save_id": self.save_id, "files": files}

    @classmethod
    def from_json(cls, data: Any, where: str) -> Checksums:
        if not isinstance(data, dict) or data.get("format") != _FORMAT or not isinstance(data.get("files"), dict):
            raise ValueError(f"{where} is not a dcplan checksum file")
        if data.get("algorithm") != ALGORITHM:
            raise ValueError(f"{where} uses checksum algorithm {data.get('algorithm')!r}; this dcplan knows {ALGORITHM}")
        items: dict[tuple[str, int], tuple[int, str]] = {}
        sizes: dict[str, int] = {}
        for rel, f in data["files"].items():
            if f.get("size") is not None:
                sizes[rel] = int(f["size"])
            for off, length, digest in f["items"]:
                items[(str(rel), int(off))] = (int(length), str(digest))
        return cls(str(data.get("save_id")), items, sizes)


def write_sidecar(directory: str, checksums: Checksums, *, fsync: bool) -> str:
    """Write the sidecar for ``checksums`` into ``directory`` (atomically, fsynced); its path."""
    final = os.path.join(directory, sidecar_name(checksums.save_id))
    tmp = final + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(checksums.to_json(), fh, separators=(",", ":"))
        fh.flush()
        if fsync:
            os.fsync(fh.fileno())
    os.replace(tmp, final)
    return final


def read_sidecar(directory: str, save_id: str) -> Checksums | None:
    """The checksums of save ``save_id`` in ``directory``; ``None`` when there is no sidecar.

    :raises ValueError: the sidecar exists but cannot be read.
    """
    path = os.path.join(directory, sidecar_name(save_id))
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} cannot be read ({exc})") from None
    return Checksums.from_json(data, path)


def checksum_file_range(path: str, ranges: Iterable[tuple[int, int]]) -> dict[tuple[int, int], str]:
    """Hash byte ranges ``(offset, length)`` of a file (the writer's fallback)."""
    out: dict[tuple[int, int], str] = {}
    with open(path, "rb") as fh:
        for off, length in ranges:
            fh.seek(off)
            h = _hasher()
            left = length
            while left > 0:
                block = fh.read(min(left, BLOCK))
                if not block:
                    break
                h.update(block)
                left -= len(block)
            out[(off, length)] = h.hexdigest()
    return out
