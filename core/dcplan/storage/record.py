"""Read a tensor straight out of its ``torch.save`` record, hashing each byte once.

A DCP data file holds one ``torch.save`` zip archive per tensor item: a small pickle
(``<prefix>/data.pkl``) that describes the tensor, and the tensor's storage bytes as a
stored (uncompressed) zip record ``<prefix>/data/<key>``. :func:`parse_record` locates
that record from the archive's central directory (zip64 aware) and reads the pickle with a
restricted unpickler that knows only the few globals a plain tensor record uses
(``torch._utils._rebuild_tensor_v2``/``v3``, ``collections.OrderedDict``, torch storage
classes and dtypes): **no code from the file is ever executed**, anything else makes it
return ``None`` and the caller falls back to ``torch.load(weights_only=True)``.

Every offset and length is checked against the item's length: a record that points
outside its item is "not recognised" (``None``), never read.

The reader then reads the item once, in file order, in 256 KiB blocks, each block straight
into the destination tensor's memory (or a scratch block for bytes it does not need) and,
when checksums are verified, hashed right after it is read (while it is in the CPU cache).
"""

from __future__ import annotations

import ctypes
import io
import pickle
import struct
import sys
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from dcplan import compat
from dcplan.storage.checksum import BLOCK

__all__ = ["BLOCK", "RecordLayout", "contiguous_span", "parse_record", "read_layout", "writable_into"]

#: items up to this size are read in one piece
SMALL = 1 << 20
#: the first read of a large item: enough for its headers and pickle
_HEAD = 64 << 10
#: the first read at a large item's end: the end-of-central-directory records (22 + 20 + 56 bytes)
_TAIL = 128
#: the largest central directory read separately
_MAX_CD = 1 << 20

_LOCAL = 0x04034B50
_CENTRAL = 0x02014B50
_EOCD = 0x06054B50
_EOCD64 = 0x06064B50
_EOCD64_LOC = 0x07064B50
#: no size or stride of a recognised record is this large (a crafted one cannot overflow torch.empty)
_MAX_DIM = 1 << 48


class _NotRecognised(Exception):
    """The record is not one the direct path reads (the caller falls back to ``torch.load``)."""


@dataclass
class RecordLayout:
    """Where a tensor record's bytes are, relative to the item's start.

    :ivar dtype: the stored dtype.
    :ivar size: the stored tensor's size.
    :ivar data_start: offset of the stored tensor's first byte (storage offset applied).
    :ivar head: the bytes already read at the item's start (``[0, len(head))``).
    :ivar tail_start: where :attr:`tail` starts (the central directory up to the item's end).
    :ivar tail: the bytes already read at the item's end.
    """

    dtype: torch.dtype
    size: tuple[int, ...]
    data_start: int
    head: bytes
    tail_start: int
    tail: bytes

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.size:
            n *= s
        return n * _elsize(self.dtype)

    @property
    def data_end(self) -> int:
        return self.data_start + self.nbytes


def _elsize(dtype: torch.dtype) -> int:
    return int(torch.empty((), dtype=dtype).element_size())


# ---------------------------------------------------------------- the restricted unpickler
@dataclass(frozen=True, slots=True)  # no __dict__: a pickle's BUILD cannot change it
class _StorageType:
    dtype: torch.dtype | None  # None: UntypedStorage (sizes in bytes)


@dataclass(frozen=True, slots=True)  # no __dict__: a pickle's BUILD cannot change it
class _StorageRef:
    dtype: torch.dtype | None
    key: str
    numel: int


@dataclass(frozen=True, slots=True)  # no __dict__: a pickle's BUILD cannot change it
class _TensorRecord:
    storage: _StorageRef
    storage_offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype


def _rebuild_v2(storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any,
                backward_hooks: Any, metadata: Any = None) -> _TensorRecord:
    return _make_record(storage, storage_offset, size, stride, backward_hooks, None, metadata)


def _rebuild_v3(storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any,
                backward_hooks: Any, dtype: Any, metadata: Any = None) -> _TensorRecord:
    return _make_record(storage, storage_offset, size, stride, backward_hooks, dtype, metadata)


def _ints(x: Any) -> tuple[int, ...]:
    if not isinstance(x, tuple) or not all(type(v) is int and 0 <= v < _MAX_DIM for v in x):
        raise _NotRecognised("size/stride")
    return x


def _make_record(storage: Any, storage_offset: Any, size: Any, stride: Any, hooks: Any, dtype: Any,
                 metadata: Any) -> _TensorRecord:
    if not isinstance(storage, _StorageRef) or type(storage_offset) is not int or storage_offset < 0:
        raise _NotRecognised("storage")
    if hooks or metadata:  # backward hooks, tensor metadata (conj/neg bits, ...): torch.load's business
        raise _NotRecognised("hooks or metadata")
    if storage.dtype is None:
        if not isinstance(dtype, torch.dtype):
            raise _NotRecognised("untyped storage without dtype")
        esize = _elsize(dtype)
        if storage.numel % esize:
            raise _NotRecognised("untyped storage size")
        storage = _StorageRef(dtype, storage.key, storage.numel // esize)
    elif dtype is not None and dtype != storage.dtype:
        raise _NotRecognised("dtype")
    assert storage.dtype is not None
    size, stride = _ints(size), _ints(stride)
    if len(size) != len(stride):
        raise _NotRecognised("rank")
    return _TensorRecord(storage, storage_offset, size, stride, storage.dtype)


def _fresh(fn: Any) -> Any:
    """A new function object per use: a pickle's BUILD may set attributes on what it gets (e.g.
    ``__defaults__``), and must not reach the module's functions."""

    def call(*args: Any) -> Any:
        return fn(*args)

    return call


class _RecordUnpickler(pickle.Unpickler):
    """Knows the globals of a plain tensor record and nothing else: it never runs code from the file."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _fresh(_rebuild_v2)
        if module == "torch._utils" and name == "_rebuild_tensor_v3":
            return _fresh(_rebuild_v3)
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module == "torch.storage" and name == "UntypedStorage":
            return _StorageType(None)
        if module == "torch":
            dtype = compat.dtype_by_name(name)
            if dtype is not None:
                return dtype
            dtype = compat.legacy_storage_dtype(name)
            if dtype is not None:
                return _StorageType(dtype)
        raise _NotRecognised(f"global {module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        if (not isinstance(pid, tuple) or len(pid) != 5 or pid[0] != "storage" or not isinstance(pid[1], _StorageType)
                or not isinstance(pid[2], str) or type(pid[4]) is not int or pid[4] < 0):
            raise _NotRecognised("persistent id")
        return _StorageRef(pid[1].dtype, pid[2], pid[4])


def read_tensor_pickle(data: bytes) -> _TensorRecord:
    """The tensor a record's ``data.pkl`` describes; :class:`_NotRecognised` for anything else."""
    try:
        obj = _RecordUnpickler(io.BytesIO(data)).load()
    except _NotRecognised:
        raise
    except Exception as exc:  # noqa: BLE001 - any malformed pickle
        raise _NotRecognised(f"pickle: {exc}") from None
    if not isinstance(obj, _TensorRecord):
        raise _NotRecognised("not a tensor")
    st = obj.storage
    if (not isinstance(st, _StorageRef) or not isinstance(st.dtype, torch.dtype) or st.dtype != obj.dtype
            or not isinstance(st.key, str) or type(st.numel) is not int or st.numel < 0):
        raise _NotRecognised("storage")
    _ints(obj.size), _ints(obj.stride)
    return obj


# ---------------------------------------------------------------- the zip structure
def _u(fmt: str, buf: bytes, off: int) -> tuple[int, ...]:
    if off < 0 or off + struct.calcsize(fmt) > len(buf):
        raise _NotRecognised("short structure")
    return struct.unpack_from(fmt, buf, off)


def _zip64_extra(extra: bytes, need: list[bool]) -> list[int]:
    """The zip64 extra field's values for the fields marked 0xFFFFFFFF (in order)."""
    pos = 0
    while pos + 4 <= len(extra):
        hid, hlen = struct.unpack_from("<HH", extra, pos)
        if hid == 1:
            vals = []
            p = pos + 4
            for n in need:
                if n:
                    if p + 8 > pos + 4 + hlen:
                        raise _NotRecognised("zip64 extra")
                    vals.append(struct.unpack_from("<Q", extra, p)[0])
                    p += 8
            return vals
        pos += 4 + hlen
    raise _NotRecognised("zip64 extra missing")


def _central_directory(tail: bytes, tail_start: int, length: int) -> tuple[int, int]:
    """``(offset, size)`` of the central directory, from the end records in ``tail``."""
    eocd = len(tail) - 22
    sig, disk, cd_disk, n_disk, n, cd_size, cd_off, comment = _u("<IHHHHIIH", tail, eocd)
    if sig != _EOCD or comment != 0 or disk != 0 or cd_disk != 0:
        raise _NotRecognised("end of central directory")
    end = tail_start + eocd
    if n == 0xFFFF or cd_size == 0xFFFFFFFF or cd_off == 0xFFFFFFFF:  # zip64
        sig, _disk, eocd64, _ndisks = _u("<IIQI", tail, eocd - 20)
        if sig != _EOCD64_LOC or not tail_start <= eocd64 <= end - 56:
            raise _NotRecognised("zip64 locator")
        sig, _sz, _v1, _v2, _d1, _d2, _n1, n, cd_size, cd_off = _u("<IQHHIIQQQQ", tail, eocd64 - tail_start)
        if sig != _EOCD64:
            raise _NotRecognised("zip64 end of central directory")
        end = eocd64
    if cd_off + cd_size > end or cd_off < 0:
        raise _NotRecognised("central directory outside the item")
    return cd_off, cd_size


def _entries(cd: bytes) -> dict[str, tuple[int, int, int, int]]:
    """``name -> (method, compressed size, size, local header offset)``."""
    out = {}
    pos = 0
    while pos < len(cd):
        (sig, _vm, _vn, flags, method, _t, _d, _crc, csize, usize, nlen, elen, clen, _dn, _ia, _ea,
         lho) = _u("<IHHHHHHIIIHHHHHII", cd, pos)
        if sig != _CENTRAL:
            raise _NotRecognised("central directory entry")
        name_end = pos + 46 + nlen
        name = cd[pos + 46 : name_end].decode("utf-8", "replace")
        if 0xFFFFFFFF in (usize, csize, lho):
            vals = iter(_zip64_extra(cd[name_end : name_end + elen], [usize == 0xFFFFFFFF, csize == 0xFFFFFFFF,
                                                                      lho == 0xFFFFFFFF]))
            usize = next(vals) if usize == 0xFFFFFFFF else usize
            csize = next(vals) if csize == 0xFFFFFFFF else csize
            lho = next(vals) if lho == 0xFFFFFFFF else lho
        if flags & 1:  # encrypted
            raise _NotRecognised("encrypted entry")
        out[name] = (method, csize, usize, lho)
        pos = name_end + elen + clen
    return out


class _Window:
    """The bytes read so far: ``head`` at 0 and ``tail`` at ``tail_start``."""

    def __init__(self, head: bytes, tail: bytes, tail_start: int) -> None:
        self.head, self.tail, self.tail_start = head, tail, tail_start

    def get(self, off: int, n: int) -> bytes:
        if off >= 0 and off + n <= len(self.head):
            return self.head[off : off + n]
        if off >= self.tail_start and off + n <= self.tail_start + len(self.tail):
            return self.tail[off - self.tail_start : off - self.tail_start + n]
        raise _NotRecognised("record outside what was read")


def _record_data(win: _Window, entries: dict[str, tuple[int, int, int, int]], name: str, limit: int) -> tuple[int, int]:
    """``(start, size)`` of a stored record's data; it must end before ``limit``."""
    if name not in entries:
        raise _NotRecognised(f"no record {name}")
    method, csize, usize, lho = entries[name]
    if method != 0 or csize != usize:
        raise _NotRecognised("compressed record")
    sig, _v, flags, lmethod, _t, _d, _crc, _cs, _us, nlen, elen = _u("<IHHHHHIIIHH", win.get(lho, 30), 0)
    if sig != _LOCAL or lmethod != 0 or flags & 1:
        raise _NotRecognised("local header")
    start = lho + 30 + nlen + elen
    if win.get(lho + 30, nlen).decode("utf-8", "replace") != name or start + usize > limit:
        raise _NotRecognised("record outside the item")
    return start, usize


def _read_at(fh: Any, base: int, off: int, n: int) -> bytes:
    fh.seek(base + off)
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = fh.readinto(view[got:])
        if not k:
            raise _NotRecognised("short read")
        got += k
    return bytes(buf)


def parse_record(fh: Any, offset: int, length: int) -> RecordLayout | None:
    """Locate the tensor in the ``torch.save`` record at ``offset`` (``length`` bytes) of ``fh``.

    Reads the item's head (the pickle and local headers, or the whole item when it is small)
    and its tail (the central directory). ``None`` when the record is not a plain tensor
    record the direct path reads; the bytes read are then not used.
    """
    try:
        return _parse(fh, offset, length)
    except OSError:
        raise
    except Exception:  # noqa: BLE001 - _NotRecognised, or anything a malformed record makes torch refuse
        return None


def _parse(fh: Any, offset: int, length: int) -> RecordLayout:
    if length < 22:
        raise _NotRecognised("too short")
    if length <= SMALL:
        head = _read_at(fh, offset, 0, length)
        tail_start, tail = length, b""
        cd_off, cd_size = _central_directory(head, 0, length)
        cd = head[cd_off : cd_off + cd_size]
    else:
        tail_start = length - _TAIL
        tail = _read_at(fh, offset, tail_start, _TAIL)
        cd_off, cd_size = _central_directory(tail, tail_start, length)
        if cd_off < tail_start:
            if tail_start - cd_off > _MAX_CD:
                raise _NotRecognised("central directory too large")
            tail = _read_at(fh, offset, cd_off, tail_start - cd_off) + tail
            tail_start = cd_off
        cd = tail[cd_off - tail_start : cd_off - tail_start + cd_size]
        head = _read_at(fh, offset, 0, min(_HEAD, tail_start))
    entries = _entries(cd)
    win = _Window(head, tail, tail_start)
    pkl_names = [n for n in entries if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pkl_names) != 1:
        raise _NotRecognised("no data.pkl")
    prefix = pkl_names[0][: -len("data.pkl")]
    limit = cd_off  # every record lies before the central directory
    start, size = _record_data(win, entries, pkl_names[0], limit)
    rec = read_tensor_pickle(win.get(start, size))
    if prefix + "byteorder" in entries:
        start, size = _record_data(win, entries, prefix + "byteorder", limit)
        if win.get(start, size).decode("ascii", "replace") != sys.byteorder:
            raise _NotRecognised("byte order")
    esize = _elsize(rec.dtype)
    # the data must end before the bytes read at the item's end
    data_start, data_size = _record_data(win, entries, prefix + "data/" + rec.storage.key, min(limit, tail_start))
    if data_size != rec.storage.numel * esize:
        raise _NotRecognised("storage size")
    if data_start > len(head) or len(entries) != len({n for n in entries if n.startswith(prefix)}):
        raise _NotRecognised("layout")
    numel = 1
    for s in rec.size:
        numel *= s
    if numel and not compat.strides_are_contiguous(rec.size, rec.stride):
        raise _NotRecognised("non-contiguous stored tensor")
    if rec.storage_offset + numel > rec.storage.numel:
        raise _NotRecognised("tensor outside its storage")
    return RecordLayout(rec.dtype, rec.size, data_start + rec.storage_offset * esize, head, tail_start, tail)


# ---------------------------------------------------------------- reading into the destination
def contiguous_span(size: tuple[int, ...], offsets: tuple[int, ...], lengths: tuple[int, ...]) -> int | None:
    """The first element of the part ``offsets``/``lengths`` of a row-major ``size`` tensor, when
    that part is one contiguous run of elements; else ``None``."""
    numel = 1
    for n in lengths:
        numel *= n
    if numel == 0:
        return 0
    last = max((d for d in range(len(size)) if lengths[d] != size[d]), default=-1)
    if any(lengths[d] != 1 for d in range(last)):
        return None
    start, stride = 0, 1
    for d in reversed(range(len(size))):
        start += offsets[d] * stride
        stride *= size[d]
    return start


def writable_into(t: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether raw bytes of ``dtype`` may be read straight into ``t``'s memory."""
    return (type(t) is torch.Tensor and t.device.type == "cpu" and t.layout == torch.strided
            and t.dtype == dtype and t.is_contiguous() and not t.is_conj() and not t.is_neg()
            and not t.is_quantized)


def _byte_view(t: torch.Tensor) -> memoryview:
    n = t.numel() * t.element_size()
    if n == 0:
        return memoryview(bytearray(0))
    return memoryview((ctypes.c_char * n).from_address(t.data_ptr())).cast("B")


def _read_into(fh: Any, n: int, out: memoryview | None, hasher: Any, scratch: list[memoryview]) -> None:
    """Read ``n`` bytes from ``fh``'s position into ``out`` (or a scratch block), block by block."""
    done = 0
    while done < n:
        k = min(BLOCK, n - done)
        if out is not None:
            view = out[done : done + k]
        else:
            if not scratch:
                scratch.append(memoryview(bytearray(BLOCK)))
            view = scratch[0][:k]
        got = fh.readinto(view)
        if not got:
            raise EOFError
        if hasher is not None:
            hasher.update(view[:got])
        done += got


def read_layout(fh: Any, path: str, offset: int, length: int, layout: RecordLayout, start: int,
                dest: torch.Tensor, hasher: Any) -> None:
    """Read the item whose layout is ``layout``: bytes ``[start, start + dest's size)`` of it go into
    ``dest``'s memory, every byte of the item not yet read is read once, in order, and all
    ``length`` bytes go through ``hasher`` (if any) in file order."""
    out = _byte_view(dest)
    head, ts = layout.head, layout.tail_start
    w0, w1 = start, start + len(out)
    if not (0 <= w0 <= w1 <= max(ts, len(head))):  # pragma: no cover - parse_record guarantees it
        raise ValueError(f"{path}: bad record layout")
    if hasher is not None:
        hasher.update(head)
    h = len(head)
    if w0 < h and w1 > w0:
        k = min(w1, h) - w0
        out[:k] = head[w0 : w0 + k]
    if h < ts:
        fh.seek(offset + h)
        scratch: list[memoryview] = []
        a = max(h, w0)
        _read_into(fh, max(0, min(w0, ts) - h), None, hasher, scratch)
        if w1 > a:
            _read_into(fh, w1 - a, out[a - w0 :], hasher, scratch)
        b = max(h, w1)
        _read_into(fh, ts - b, None, hasher, scratch)
    if hasher is not None:
        hasher.update(layout.tail)
