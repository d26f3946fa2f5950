"""``dcplan.FileSystemWriter``: torch's file-system writer with an atomic commit and checksums.

How a save stays atomic (details and crash cases in ``docs/storage.md``):

1. Every rank writes its data files under names no earlier save used:
   ``__<rank>_<save token>_<n>.distcp`` (the token is fresh per save and rank). Files of
   the checkpoint already at ``PATH`` are never opened for writing.
2. Data files are fsynced before a rank reports its results (``sync_files``, on by default).
3. The coordinator writes the checksum sidecar and ``.metadata`` to temporary names,
   fsyncs both, then ``os.replace``\\ s the temporary ``.metadata`` onto ``PATH/.metadata``:
   **that one rename is the commit**, and it is atomic on a POSIX file system. Before it a
   loader sees the old ``.metadata``, which names only the old files; after it, the new one.
4. After the commit the coordinator fsyncs the directory and removes what no longer
   belongs to the checkpoint: data files ``.metadata`` does not name, other sidecars,
   temporary files. A crash before this step only leaves such leftovers; the next save
   removes them and ``dcplan verify`` reports them.

**Test hook.** ``_DCPLAN_TEST_CRASH_AT=<point>[@<rank>]`` makes the process exit at once
(``os._exit(86)``) when it reaches ``point`` (``write_data`` after this rank's files are
written, ``finish.start``, ``finish.before_commit``, ``finish.after_commit``), on every rank
or on the given rank. It exists for the crash tests; never set it in production.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import warnings
from collections.abc import Generator, Sequence
from contextlib import contextmanager
from typing import Any

from torch.distributed.checkpoint import FileSystemWriter as _TorchFileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystem, _StoragePrefix

from dcplan import compat
from dcplan.storage.checksum import (
    Checksums,
    HashingStream,
    checksum_file_range,
    is_sidecar_name,
    new_save_id,
    save_token,
    sidecar_name,
    write_sidecar,
)

__all__ = ["CRASH_ENV", "FileSystemWriter", "SealedStorageInfo"]

#: Environment variable of the crash test hook (see the module docstring).
CRASH_ENV = "_DCPLAN_TEST_CRASH_AT"  # not DCPLAN_*: config refuses unknown DCPLAN_ variables
_METADATA = ".metadata"


def _crash_point(point: str, rank: int | None) -> None:
    """The crash test hook: exit now if ``_DCPLAN_TEST_CRASH_AT`` names this point (and rank)."""
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return
    where, _, who = spec.partition("@")
    if where == point and (not who or (rank is not None and int(who) == rank)):
        os._exit(86)


@dataclasses.dataclass(frozen=True)
class SealedStorageInfo:
    """A ``_StorageInfo`` with the checksum of its bytes, on its way from a rank to ``finish``."""

    info: Any
    digest: str
    file_size: int


class _ChecksumFileSystem(FileSystem):  # type: ignore[misc]
    """torch's ``FileSystem`` whose data-file write streams hash what is written."""

    def __init__(self, checksums: bool = True) -> None:
        super().__init__()
        self.checksums = checksums
        self.segments: dict[str, dict[tuple[int, int], str]] = {}
        self.crash_rank: int | None = None

    @contextmanager
    def create_stream(self, path: str | os.PathLike[str], mode: str) -> Generator[Any, None, None]:
        with super().create_stream(path, mode) as stream:
            if not self.checksums or "w" not in mode or not os.fspath(path).endswith(".distcp"):
                yield stream
                return
            hashing = HashingStream(stream)
            yield hashing
            self.segments[os.path.basename(os.fspath(path))] = hashing.finish()
        _crash_point("write_data", self.crash_rank)


class FileSystemWriter(_TorchFileSystemWriter):  # type: ignore[misc]
    """Drop-in for torch's ``FileSystemWriter`` (same options) that commits atomically.

    Use it with ``dcp.save(sd, storage_writer=dcplan.FileSystemWriter(path), planner=...)``,
    ``dcp.async_save`` or :func:`dcplan.save`. ``sync_files`` (default ``True``) fsyncs data,
    checksums and ``.metadata`` before the commit; ``False`` keeps the commit atomic against
    process crashes but not against power loss.

    :param path: the checkpoint directory (created if missing; an existing checkpoint there is
        replaced atomically when the save completes).
    :param checksums: compute and store a checksum per item (default ``True``).
    :param args: torch's ``FileSystemWriter`` options, positional or by name.
    """

    def __init__(self, path: str | os.PathLike[str], *args: Any, checksums: bool = True, **kwargs: Any) -> None:
        self.checksums = bool(checksums)
        super().__init__(path, *args, **kwargs)
        self._hashing_fs = _ChecksumFileSystem(self.checksums)
        self.fs = self._hashing_fs
        self.save_id = new_save_id(self.checksums)
        self._dcplan_rank: int | None = None

    # -- per-save set-up
    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        super().reset(checkpoint_id)
        self.save_id = new_save_id(self.checksums)

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        super().set_up_storage_writer(is_coordinator, *args, **kwargs)
        self.save_id = new_save_id(self.checksums)  # fresh per save even when the writer is reused without reset
        rank = kwargs.get("rank")
        if rank is None:
            rank = _dist_rank()
        self._dcplan_rank = rank
        self._hashing_fs.crash_rank = rank

    def prepare_local_plan(self, plan: Any) -> Any:
        with warnings.catch_warnings():  # replacing a checkpoint is what this writer does safely
            warnings.filterwarnings("ignore", message="Detected an existing checkpoint")
            return super().prepare_local_plan(plan)

    # torch's version reads no plan items: compact plans (dcplan.save.wire) may pass through it
    prepare_local_plan._dcplan_ignores_items = True  # type: ignore[attr-defined]

    def storage_meta(self) -> Any:
        # the save id names the checksum file: it must reach .metadata on every torch
        meta = super().storage_meta()
        if meta is None:
            return compat.new_storage_meta(self.checkpoint_id, self.save_id)
        meta.save_id = self.save_id
        return meta

    # -- data
    def write_data(self, plan: Any, planner: Any) -> Any:
        prefix = getattr(plan.storage_data, "prefix", None) or f"__{self._dcplan_rank or 0}_"
        token = save_token(self.save_id)
        plan = dataclasses.replace(plan, storage_data=_StoragePrefix(f"{prefix}{token}_"))
        self._hashing_fs.segments = {}
        self._hashing_fs.checksums = self.checksums  # checksums=False: nothing is hashed
        future = super().write_data(plan, planner)
        if not self.checksums:
            return future
        return future.then(lambda done: self._seal(done.value()))

    def _seal(self, results: Sequence[Any]) -> list[Any]:
        """Attach each result's checksum (hashed while written, else read back from the file)."""
        root = os.fspath(self.path)
        missing: dict[str, list[tuple[int, int]]] = {}
        for wr in results:
            info = wr.storage_data
            key = (info.offset, info.offset + info.length)
            if key not in self._hashing_fs.segments.get(info.relative_path, {}):
                missing.setdefault(info.relative_path, []).append((info.offset, info.length))
        for rel, ranges in missing.items():
            got = checksum_file_range(os.path.join(root, rel), ranges)
            seg = self._hashing_fs.segments.setdefault(rel, {})
            for (off, length), digest in got.items():
                seg[(off, off + length)] = digest
        sizes = {rel: os.path.getsize(os.path.join(root, rel)) for rel in {wr.storage_data.relative_path for wr in results}}
        out = []
        for wr in results:
            info = wr.storage_data
            digest = self._hashing_fs.segments[info.relative_path][(info.offset, info.offset + info.length)]
            out.append(dataclasses.replace(wr, storage_data=SealedStorageInfo(info, digest, sizes[info.relative_path])))
        return out

    # -- commit
    def finish(self, metadata: Any, results: list[list[Any]]) -> None:
        rank = self._dcplan_rank
        _crash_point("finish.start", rank)
        storage_md: dict[Any, Any] = {}
        sums: dict[tuple[str, int], tuple[int, str]] = {}
        sizes: dict[str, int] = {}
        for wr_list in results:
            for wr in wr_list:
                sd = wr.storage_data
                if isinstance(sd, SealedStorageInfo):
                    sums[(sd.info.relative_path, int(sd.info.offset))] = (int(sd.info.length), sd.digest)
                    sizes[sd.info.relative_path] = sd.file_size
                    sd = sd.info
                storage_md[wr.index] = sd
        metadata.storage_data = storage_md
        compat.stamp_metadata(metadata, self.storage_meta())
        root = os.fspath(self.path)
        if self.checksums:
            write_sidecar(root, Checksums(self.save_id, sums, sizes), fsync=self.sync_files)
        name = _METADATA if getattr(self, "use_collectives", True) or rank is None else f"__{rank}{_METADATA}"
        tmp = os.path.join(root, f"{_METADATA}.{self.save_id}.tmp")
        with open(tmp, "wb") as fh:
            pickle.dump(metadata, fh)
            fh.flush()
            if self.sync_files:
                os.fsync(fh.fileno())
        _crash_point("finish.before_commit", rank)
        os.replace(tmp, os.path.join(root, name))  # the commit
        if self.sync_files:
            _fsync_dir(root)
        _crash_point("finish.after_commit", rank)
        if name == _METADATA:
            remove_leftovers(root, storage_md.values(), keep=sidecar_name(self.save_id))


def leftovers(root: str, storage_infos: Any, keep: str | None = None) -> list[str]:
    """Files in ``root`` that belong to no committed checkpoint (interrupted or replaced saves).

    Data files (``*.distcp``) that ``storage_infos`` does not name, dcplan sidecars other than
    ``keep``, and temporary ``.metadata``/sidecar files. Never directories, never other files.
    """
    referenced = {os.path.normpath(str(getattr(i, "relative_path", ""))) for i in storage_infos}
    out = []
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        name = entry.name
        if not entry.is_file(follow_symlinks=False):
            continue
        if (name.endswith(".distcp") and name not in referenced) or (
            is_sidecar_name(name) and name != keep) or (
            name.startswith(".metadata.") and name.endswith(".tmp")) or (
            name.startswith(".dcplan-") and name.endswith(".checksums.json.tmp")
        ):
            out.append(name)
    return out


def remove_leftovers(root: str, storage_infos: Any, keep: str | None = None) -> list[str]:
    """Remove :func:`leftovers`; returns what was removed (a failure is a warning, not an error)."""
    removed = []
    for name in leftovers(root, storage_infos, keep):
        try:
            os.unlink(os.path.join(root, name))
            removed.append(name)
        except OSError as exc:
            warnings.warn(f"dcplan: could not remove leftover {os.path.join(root, name)}: {exc}", stacklevel=2)
    return removed


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - a platform without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some file systems refuse directory fsync
        pass
    finally:
        os.close(fd)


def _dist_rank() -> int | None:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else None

