"""``dcplan.FileSystemReader``: torch's file-system reader, made safe and checked.

* ``.metadata`` is read with dcplan's allow-list unpickler (:mod:`dcplan.load.safe`).
* Every storage path must stay inside the checkpoint directory: no absolute path, no
  ``..``, no symlink that resolves outside (:func:`confined_path`).
* A missing, empty or truncated data file is a :class:`CorruptCheckpointError` that names
  the file, the item and the bytes expected.
* When the checkpoint carries dcplan checksums (written by :class:`dcplan.FileSystemWriter`)
  each item's bytes are hashed as they are read (each byte once, in 256 KiB blocks) and
  checked; a mismatch names the file, the item and the offset. ``verify_checksums=False``
  skips the check. Checkpoints written by torch's own writer have no checksums and load as before.
* A tensor is read straight from its ``torch.save`` record into the destination tensor when
  the record is a plain tensor record (:mod:`dcplan.storage.record`), else through
  ``torch.load(weights_only=True)``. On the direct path a checksum mismatch is found after
  the bytes reached the destination: the load raises, but the destination may hold them.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from typing import Any

import torch
import xxhash
from torch.distributed.checkpoint import FileSystemReader as _TorchFileSystemReader
from torch.distributed.checkpoint.planner import LoadItemType
from torch.futures import Future

from dcplan import compat
from dcplan.config import Config, resolve_config
from dcplan.load.safe import (
    CheckpointPathError,
    CheckpointReadError,
    CorruptCheckpointError,
    check_trusted_globals,
    collect_safe_globals,
    read_metadata_file,
)
from dcplan.storage.checksum import ALGORITHM, Checksums, digest_bytes, has_checksums, read_sidecar, sidecar_name
from dcplan.storage.record import contiguous_span, parse_record, read_layout, writable_into

__all__ = ["FileSystemReader", "confined_path", "load_checksums"]


def confined_path(root: str, relative_path: Any) -> str:
    """``root/relative_path``, refused when it leaves ``root``.

    :raises CheckpointPathError: an absolute path, a ``..`` component, or a path whose
        symlinks resolve outside ``root``.
    """
    rel = os.fspath(relative_path) if isinstance(relative_path, (str, os.PathLike)) else None
    if not isinstance(rel, str) or not rel:
        raise CheckpointPathError(f"{root}/.metadata has a storage entry whose path is {relative_path!r}, not a file name")
    parts = rel.replace("\\", "/").split("/")
    if os.path.isabs(rel) or rel.startswith(("/", "\\")) or ".." in parts:
        raise CheckpointPathError(
            f"{root}/.metadata points a storage entry at {rel!r}, outside the checkpoint directory; "
            "refusing to read it (a checkpoint only reads files inside its own directory)"
        )
    full = os.path.join(root, rel)
    real_root = os.path.realpath(root)
    real = os.path.realpath(full)
    if os.path.commonpath([real_root, real]) != real_root:
        raise CheckpointPathError(
            f"{full} is a symlink to {real}, outside the checkpoint directory {root}; refusing to read it"
        )
    return full


def load_checksums(root: str, metadata: Any) -> Checksums | None:
    """The checksums of the checkpoint whose ``.metadata`` is ``metadata``; ``None`` if it has none.

    :raises CorruptCheckpointError: dcplan wrote the checkpoint but its checksum file is
        missing or unreadable.
    """
    save_id = getattr(compat.metadata_storage_meta(metadata), "save_id", None)
    if not has_checksums(save_id):
        return None
    assert isinstance(save_id, str)
    where = os.path.join(root, sidecar_name(save_id))
    try:
        sums = read_sidecar(root, save_id)
    except ValueError as exc:
        raise CorruptCheckpointError(f"{exc}; restore it, or pass verify_checksums=False to load unchecked") from None
    if sums is None:
        raise CorruptCheckpointError(
            f"{root} was written by dcplan (save {save_id}) but its checksum file {where} is missing; "
            "restore it, or pass verify_checksums=False (dcplan verify --no-checksums) to use the data unchecked"
        )
    return sums


def _item_name(req: Any) -> str:
    index = req.storage_index
    offset = getattr(index, "offset", None)
    return f"{index.fqn}" + (f" (chunk at {list(offset)})" if offset is not None and len(offset) else "")


class FileSystemReader(_TorchFileSystemReader):  # type: ignore[misc]
    """Drop-in for torch's ``FileSystemReader``: safe ``.metadata``, confined paths, checksums.

    Use it with ``dcp.load(sd, storage_reader=dcplan.FileSystemReader(path), planner=dcplan.LoadPlanner())``
    or :func:`dcplan.load`. A missing path, a directory that is not a checkpoint, a truncated
    or corrupted ``.metadata`` and a ``.metadata`` that needs a non-admitted global each raise
    a :class:`dcplan.DcplanError` with a one-line message; so do missing, empty, truncated and
    corrupted data files, and storage paths outside the directory.

    :param path: the checkpoint directory.
    :param config: a :class:`dcplan.Config` or mapping; ``None`` reads config sources.
    :param trust: shortcut for ``trust_checkpoint=True`` (DANGEROUS).
    :param verify_checksums: check each item against the checkpoint's checksums (default
        ``True``; checkpoints without checksums load unchecked either way).
    :param overrides: config keys, e.g. ``trusted_globals=[...]``.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *args: Any,
        config: Config | Mapping[str, Any] | None = None,
        trust: bool | None = None,
        plugin_manager: Any = None,
        verify_checksums: bool = True,
        **overrides: Any,
    ) -> None:
        cfg_keys = {k: overrides.pop(k) for k in list(overrides) if k in _config_keys()}
        if trust is not None:
            cfg_keys["trust_checkpoint"] = trust
        super().__init__(path, *args, **overrides)
        self.config, _ = resolve_config(config, cfg_keys)
        check_trusted_globals(self.config)
        self._pm = plugin_manager
        self.verify_checksums = bool(verify_checksums)
        self.checksums: Checksums | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_pm"] = None
        return state

    def _safe_pairs(self) -> list[tuple[Any, str]]:
        pm = self._pm
        if pm is None:
            from dcplan.manager import get_plugin_manager

            pm = get_plugin_manager()
        return collect_safe_globals(self.config, pm)

    def read_metadata(self, *args: Any, **kwargs: Any) -> compat.Metadata:
        path = compat.metadata_file_path(self, kwargs.get("rank"))
        root = os.fspath(self.path)
        if not os.path.exists(root):
            raise CheckpointReadError(f"no checkpoint at {root}: the path does not exist")
        if not os.path.isdir(root):
            raise CheckpointReadError(f"{root} is not a DCP checkpoint: it is a file, not a directory")
        if not os.path.exists(os.fspath(path)):
            raise CheckpointReadError(f"{root} is not a DCP checkpoint: it has no .metadata file")
        try:
            with self.fs.create_stream(path, "rb") as stream:
                data = stream.read()
        except OSError as exc:
            raise CheckpointReadError(f"cannot read {path}: {exc.strerror or exc}") from None
        metadata = read_metadata_file(
            io.BytesIO(data),
            where=os.fspath(path),
            extra_globals=self._safe_pairs(),
            trust=self.config.trust_checkpoint,
        )
        return compat.finish_read_metadata(self, metadata)

    def set_up_storage_reader(self, metadata: Any, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        super().set_up_storage_reader(metadata, is_coordinator, *args, **kwargs)
        self.checksums = load_checksums(os.fspath(self.path), metadata) if self.verify_checksums else None

    # -- data
    def read_data(self, plan: Any, planner: Any) -> Future[None]:
        """Read, check and hand over every item of ``plan``; all reads are done when this returns.

        A planner with a ``finish_reads`` method (a load strategy such as ``cooperative``,
        see :mod:`dcplan.load.strategy`) is called once after this rank's own reads, with a
        function that reads more items the same way, and the error of the reads if any (it
        tells the peers, then re-raises).
        """
        finish_reads = getattr(planner, "finish_reads", None)
        if not callable(finish_reads):
            self._read_plan(plan, planner)
        else:
            error: BaseException | None = None
            try:
                self._read_plan(plan, planner)
            except Exception as exc:  # noqa: BLE001 - handed to finish_reads, which tells the peers and re-raises
                error = exc
            finish_reads(plan, read=lambda more: self._read_plan(more, planner), error=error)
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut

    def prepare_local_plan(self, plan: Any) -> Any:
        """torch's, plus the mark that this reader calls ``planner.finish_reads`` (load strategies)."""
        from dcplan.load.strategy import mark_reader

        return mark_reader(super().prepare_local_plan(plan))

    def _read_plan(self, plan: Any, planner: Any) -> None:
        per_file: dict[str, list[Any]] = {}
        for req in plan.items:
            per_file.setdefault(self.storage_data[req.storage_index].relative_path, []).append(req)
        root = os.fspath(self.path)
        for rel, reqs in per_file.items():
            self._read_file(root, rel, reqs, planner)

    def _read_file(self, root: str, rel: str, reqs: list[Any], planner: Any) -> None:
        path = confined_path(root, rel)
        reqs = sorted(reqs, key=lambda r: int(self.storage_data[r.storage_index].offset))
        try:
            fh = self._open_data(path)
        except FileNotFoundError:
            raise CorruptCheckpointError(
                f"data file {path} is missing; .metadata expects it to hold {len(reqs)} item(s) "
                f"(e.g. {_item_name(reqs[0])}); the checkpoint is incomplete: restore the file or re-save"
            ) from None
        except OSError as exc:
            raise CorruptCheckpointError(f"cannot open data file {path}: {exc.strerror or exc}") from None
        try:
            size = os.fstat(fh.fileno()).st_size
            for req in reqs:
                if req.type != LoadItemType.BYTE_IO:
                    self._check_bounds(path, size, req)
                    if self._read_tensor_direct(fh, path, req, planner):
                        continue
                stream = self._read_item(fh, path, size, req)
                try:
                    self._use_item(path, req, stream, planner)
                finally:
                    stream.close()
        finally:
            fh.close()

    def _open_data(self, path: str) -> Any:
        """Open a data file for reading (binary, seekable; ``readinto``/``read``/``fileno``).

        The one place data bytes come from: a subclass may wrap the file to meter or throttle
        reads (:class:`dcplan.testing.storage.MeteredFileSystemReader`).
        """
        return open(path, "rb")  # noqa: SIM115 - closed by _read_file

    def _check_bounds(self, path: str, size: int, req: Any) -> None:
        info = self.storage_data[req.storage_index]
        offset, length = int(info.offset), int(info.length)
        if offset + length > size:
            what = "empty (0 bytes)" if size == 0 else f"truncated ({size} bytes)"
            raise CorruptCheckpointError(
                f"data file {path} is {what}, but item {_item_name(req)} needs bytes {offset}..{offset + length}; "
                "the checkpoint was not fully written or was damaged: restore the file or re-save"
            )

    def _read_tensor_direct(self, fh: Any, path: str, req: Any, planner: Any) -> bool:
        """Read a tensor item straight from its record into the destination (:mod:`.record`).

        ``False`` (nothing used, nothing resolved) when the record is not one the direct path
        reads; the caller then takes the ``torch.load`` path. The item's bytes are read once,
        in file order, in 256 KiB blocks, each hashed right after it is read. When the stored
        chunk matches the destination (same dtype, contiguous CPU memory, a contiguous part of
        the chunk), the bytes go straight into the destination: on a checksum mismatch the
        destination may then already hold them when the error is raised.
        """
        info = self.storage_data[req.storage_index]
        if getattr(info, "transform_descriptors", None):
            return False
        offset, length = int(info.offset), int(info.length)
        layout = parse_record(fh, offset, length)
        if layout is None:
            return False
        offsets, lengths = tuple(int(x) for x in req.storage_offsets), tuple(int(x) for x in req.lengths)
        if len(lengths) != len(layout.size) or any(o + n > s for o, n, s in zip(offsets, lengths, layout.size)):
            return False  # torch.load's path reports it
        target = planner.resolve_tensor(req).detach()
        if tuple(target.size()) != lengths:
            raise CorruptCheckpointError(
                f"item {_item_name(req)} in {path}: stored chunk has size {list(lengths)}, "
                f"the load plan expects {list(target.size())}"
            )
        esize = target.element_size() if target.dtype == layout.dtype else None
        span = contiguous_span(layout.size, offsets, lengths)
        if span is not None and esize is not None and writable_into(target, layout.dtype):
            dest, start = target, layout.data_start + span * esize
        else:
            dest, start = torch.empty(layout.size, dtype=layout.dtype), layout.data_start
        hasher = xxhash.xxh3_64() if self.checksums is not None else None
        try:
            read_layout(fh, path, offset, length, layout, start, dest, hasher)
        except EOFError:
            raise CorruptCheckpointError(
                f"data file {path} ended while reading item {_item_name(req)} at offset {offset}; "
                "it was truncated while being read: restore the file or re-save"
            ) from None
        if hasher is not None:
            self._check(path, info.relative_path, offset, length, hasher.hexdigest(), req)
        if dest is not target:
            target.copy_(compat.narrow_tensor_by_index(dest, offsets, lengths))
        else:
            compat.bump_version(target)  # written behind autograd's back, like copy_ would have
        planner.commit_tensor(req, target)
        return True

    def _read_item(self, fh: Any, path: str, size: int, req: Any) -> Any:
        """Bounds-check and checksum one item; a stream over its bytes for :meth:`_use_item`."""
        info = self.storage_data[req.storage_index]
        offset, length = int(info.offset), int(info.length)
        self._check_bounds(path, size, req)
        if req.type == LoadItemType.BYTE_IO:
            fh.seek(offset)
            data = fh.read(length)
            if self.checksums is not None:
                self._check(path, info.relative_path, offset, length, digest_bytes(data), req)
            return io.BytesIO(data)
        if self.checksums is None:
            return FileSlice(fh, offset, length)
        # a tensor: hashed while torch.load reads it (each block right after it is read, while it
        # is in the CPU cache) and checked in _use_item before anything reaches the state dict
        return FileSlice(fh, offset, length, hashing=True)

    def _check(self, path: str, rel: str, offset: int, length: int, got: str, req: Any) -> None:
        assert self.checksums is not None
        recorded = self.checksums.lookup(rel, offset)
        if recorded is None or recorded[0] != length:
            raise CorruptCheckpointError(
                f"item {_item_name(req)} at {path} offset {offset} has no matching checksum in "
                f"{sidecar_name(self.checksums.save_id)}; .metadata and the checksum file disagree: restore both "
                "from a good copy or re-save (verify_checksums=False loads unchecked)"
            )
        if got != recorded[1]:
            raise CorruptCheckpointError(
                f"checksum mismatch in data file {path} at offset {offset} ({length} bytes, item {_item_name(req)}): "
                f"expected {ALGORITHM} {recorded[1]}, got {got}; the file is corrupted: restore it or re-save "
                "(verify_checksums=False loads it unchecked)"
            )

    def _use_item(self, path: str, req: Any, stream: Any, planner: Any) -> None:
        info = self.storage_data[req.storage_index]
        descriptors = getattr(info, "transform_descriptors", None)
        if descriptors:  # torch >= 2.7 stream transforms (experimental extensions)
            stream = io.BytesIO(self.transforms.transform_load_stream(req, descriptors, stream).read())
        if req.type == LoadItemType.BYTE_IO:
            planner.load_bytes(req, stream)
            return
        try:
            tensor = torch.load(stream, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any decoding failure of damaged bytes
            if isinstance(stream, FileSlice) and stream.hashing:
                self._check(path, info.relative_path, int(info.offset), int(info.length), stream.digest(), req)
            raise CorruptCheckpointError(
                f"item {_item_name(req)} in data file {path} at offset {info.offset} cannot be decoded "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); the file is corrupted"
            ) from None
        if isinstance(stream, FileSlice) and stream.hashing:
            self._check(path, info.relative_path, int(info.offset), int(info.length), stream.digest(), req)
        tensor = compat.narrow_tensor_by_index(tensor, req.storage_offsets, req.lengths)
        target = planner.resolve_tensor(req).detach()
        if target.size() != tensor.size():
            raise CorruptCheckpointError(
                f"item {_item_name(req)} in {path}: stored chunk has size {list(tensor.size())}, "
                f"the load plan expects {list(target.size())}"
            )
        target.copy_(tensor)
        planner.commit_tensor(req, target)


class FileSlice(io.RawIOBase):
    """A read-only, seekable view of ``length`` bytes at ``offset`` of an open binary file.

    ``torch.load`` reads a tensor's storage straight from it into the tensor (no intermediate
    copy). With ``hashing=True`` it also computes the item's checksum, in file order: a read
    that starts at the hash cursor (or a small gap past it, hashed first) is hashed block by
    block right after each block is read, while it is still in the CPU cache, so checking
    costs no second pass over the data. Reads elsewhere (torch reads the zip directory at
    the end first) are only read. :meth:`digest` hashes whatever no read covered.
    """

    _BLOCK = 256 << 10

    def __init__(self, fh: Any, offset: int, length: int, hashing: bool = False) -> None:
        super().__init__()
        self._fh = fh
        self._start = offset
        self._len = length
        self._pos = 0
        self.hashing = hashing
        self._hashed = 0
        self._h = xxhash.xxh3_64() if hashing else None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._len}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def _raw_readinto(self, pos: int, out: memoryview) -> int:
        self._fh.seek(self._start + pos)
        return int(self._fh.readinto(out) or 0)

    def readinto(self, buffer: Any) -> int:
        out = memoryview(buffer).cast("B")
        start = self._pos
        n = max(0, min(len(out), self._len - start))
        if n == 0:
            return 0
        if self._h is None:
            got = self._raw_readinto(start, out[:n])
            self._pos += got
            return got
        if self._hashed < start <= self._hashed + self._BLOCK:  # a small gap (headers, padding)
            self._hash_to(start)
        got = 0
        while got < n:
            stop = min(n, got + self._BLOCK)
            k = self._raw_readinto(start + got, out[got:stop])
            if k <= 0:
                break
            if start + got == self._hashed:  # in order: hash the block just read, from the cache
                self._h.update(out[got : got + k])
                self._hashed += k
            got += k
        self._pos = start + got
        return got

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = self._len - self._pos
        buf = bytearray(max(0, min(size, self._len - self._pos)))
        n = self.readinto(buf)
        return bytes(buf[:n])

    def _hash_to(self, end: int) -> None:
        assert self._h is not None
        if end <= self._hashed:
            return
        buf = bytearray(min(self._BLOCK, end - self._hashed))
        view = memoryview(buf)
        while self._hashed < end:
            k = self._raw_readinto(self._hashed, view[: min(len(buf), end - self._hashed)])
            if k <= 0:
                break
            self._h.update(view[:k])
            self._hashed += k

    def digest(self) -> str:
        """The checksum of all ``length`` bytes (reads and hashes what no read has covered)."""
        assert self._h is not None
        self._hash_to(self._len)
        return str(self._h.hexdigest())


def _config_keys() -> set[str]:
    from dcplan.config import config_keys

    return set(config_keys())
