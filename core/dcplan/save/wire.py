"""What crosses the wire during planning, in a compact form (both directions).

torch gathers every rank's local plan on the coordinator and scatters the final
plans back, each pickled by ``gather_object``/``scatter_object_list``. A
``WriteItem`` pickles to about 185 bytes; the forms here cost 10-40.

* **Gathered** (rank -> coordinator): an ordinary ``SavePlan`` with
  ``items=[]`` whose ``planner_data`` is a :class:`LocalMsg`: the rank's
  :class:`~dcplan.save.planner.RankPayload` plus either its items as a
  :class:`WirePlan` (columns of an interned fqn table, types, dtypes and
  offsets/sizes as numpy arrays, compressed with ``zlib``) or, when a lower
  rank holds exactly the same plan (:mod:`dcplan.save.exchange`), only that
  rank's number. :func:`unpack_gathered` turns what the coordinator receives
  back into full plans before anything else looks at them.
* **Scattered** (coordinator -> rank): the final plan of a rank is almost
  always a subset of what it sent, with DCP's index hints set. It travels as
  a :class:`FinalMsg`: positions into the rank's local plan and the hints, as
  numpy arrays, plus a :class:`WirePlan` of the items that are not such a
  subset (a splitting strategy's sub-chunks). :func:`unpack_final`, called
  first thing in ``finish_plan``, rebuilds ordinary ``WriteItem``\\ s, so the
  storage writer's ``write_data`` sees an ordinary plan.

Any item the columns cannot express exactly (an unknown field, a non-``Size``
shape, an offset that is not its chunk's) travels as itself in
``WirePlan.raw``: the round trip is exact for every plan (tests/test_wire.py).
Torch's storage writers see ``SavePlan`` objects throughout; only
``prepare_local_plan``/``prepare_global_plan`` see the compact ones, which is
why the planner only uses this form with writers known not to read items there
(:func:`dcplan.compat.dcp_save_context`).
"""

from __future__ import annotations

import array
import dataclasses
import hashlib
import io
import operator
import pickle
import struct
import sys
import zlib
from collections.abc import Sequence
from typing import Any

import attrs
import torch

from dcplan import compat
from dcplan.compat import (
    ChunkStorageMetadata,
    MetadataIndex,
    SavePlan,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from dcplan.errors import PlanMismatchError
from dcplan.gcpause import paused_gc

__all__ = [
    "WirePlan",
    "LocalMsg",
    "FinalMsg",
    "encode_items",
    "decode_items",
    "pack_local",
    "unpack_gathered",
    "pack_final",
    "unpack_final",
    "WIRE_VERSION",
]

WIRE_VERSION = 3  # 2: small columns pickled (b"p" blobs); 3: tensor properties by name

# entry kinds
_RAW, _BYTES, _WHOLE, _SHARD = 0, 1, 2, 3
_TYPES = list(WriteItemType)
_TYPE_NO = {t: i for i, t in enumerate(_TYPES)}
_ITEM_FIELDS = frozenset(f.name for f in dataclasses.fields(WriteItem))
_KNOWN_ITEM = frozenset({"index", "type", "tensor_data", "bytes_io_data"})
_SIMPLE = _ITEM_FIELDS <= _KNOWN_ITEM and {f.name for f in dataclasses.fields(TensorWriteData)} == {
    "chunk",
    "properties",
    "size",
} and {f.name for f in dataclasses.fields(ChunkStorageMetadata)} == {"offsets", "sizes"}
_HAS_BIO = "bytes_io_data" in _ITEM_FIELDS
if _HAS_BIO:
    from torch.distributed.checkpoint.planner import BytesIOWriteData
else:  # pragma: no cover - torch < 2.8
    BytesIOWriteData = None  # type: ignore[assignment,misc]


# ---------------------------------------------------------------- tensor properties by name
def _named(kind: type) -> dict[str, Any]:
    return {str(v).rsplit(".", 1)[-1]: v for v in vars(torch).values() if isinstance(v, kind)}


_DTYPES, _LAYOUTS, _FORMATS = _named(torch.dtype), _named(torch.layout), _named(torch.memory_format)
_NAME_OF: dict[Any, str] = {}
for _table in (_DTYPES, _LAYOUTS, _FORMATS):
    for _name, _v in sorted(_table.items()):  # (aliases: the first name in sorted order; any resolves back)
        _NAME_OF.setdefault(_v, _name)
_PROPS_FIELDS = ("dtype", "layout", "requires_grad", "memory_format", "pin_memory")
_PROPS_BY_NAME = tuple(f.name for f in dataclasses.fields(compat.TensorProperties)) == _PROPS_FIELDS


def props_spec(p: Any) -> Any:
    """``p`` as a short string when it is a plain ``TensorProperties`` (about 40 bytes on the wire
    instead of 165), else ``p`` itself."""
    if not _PROPS_BY_NAME or type(p) is not compat.TensorProperties:
        return p
    rg, pin = p.requires_grad, p.pin_memory
    try:
        names = (_NAME_OF[p.dtype], _NAME_OF[p.layout], _NAME_OF[p.memory_format])
    except (KeyError, TypeError):
        return p
    if type(rg) is not bool or type(pin) is not bool:
        return p
    if _DTYPES.get(names[0]) is not p.dtype or _LAYOUTS.get(names[1]) is not p.layout or _FORMATS.get(names[2]) is not p.memory_format:
        return p
    return f"{names[0]}|{names[1]}|{int(rg)}|{names[2]}|{int(pin)}"


def props_object(spec: Any) -> Any:
    """The ``TensorProperties`` a :func:`props_spec` string names (objects pass through)."""
    if type(spec) is not str:
        return spec
    parts = spec.split("|")
    try:
        dtype, layout, rg, fmt, pin = parts
        if rg not in ("0", "1") or pin not in ("0", "1"):
            raise KeyError(spec)
        return compat.TensorProperties(
            dtype=_DTYPES[dtype], layout=_LAYOUTS[layout], requires_grad=rg == "1",
            memory_format=_FORMATS[fmt], pin_memory=pin == "1",
        )
    except (KeyError, ValueError):
        raise PlanMismatchError(
            f"dcplan: a compact plan names tensor properties this torch does not know ({spec!r}); "
            "install the same torch version on every rank"
        ) from None


@attrs.frozen
class WirePlan:
    """A list of ``WriteItem`` in columns (see the module docstring).

    :param n: number of items.
    :param blob: the columns (see :func:`encode_items`), packed by :func:`_pack`.
    :param props: the distinct ``TensorProperties`` (the ``pid`` column indexes it), each as
        its :func:`props_spec` string where it has one.
    :param raw: ``(position, item)`` of items kept as themselves.
    """

    n: int
    blob: bytes
    props: tuple[Any, ...] = ()
    raw: tuple[tuple[int, Any], ...] = ()
    version: int = WIRE_VERSION

    def __reduce__(self) -> tuple[Any, ...]:  # a tuple on the wire, no field names
        return (WirePlan, (self.n, self.blob, self.props, self.raw, self.version))

    def digest(self, *extra: Any) -> bytes:
        """16 bytes that are equal for equal encodings (plus ``extra``, pickled)."""
        h = hashlib.blake2b(digest_size=16)
        h.update(repr((self.n, self.version)).encode())
        h.update(self.blob)
        h.update(pickle.dumps((self.props, self.raw, extra), protocol=4))
        return h.digest()


_CODES = ("B", "H", "I", "Q")


def _column(values: Sequence[int] | bytes) -> tuple[bytes, bytes]:
    """(header, data) of one column: the narrowest unsigned array type that holds it, or signed 'q'."""
    if isinstance(values, bytes):
        return struct.pack("<cI", b"b", len(values)), values
    if not values:
        return struct.pack("<cI", b"B", 0), b""
    lo, hi = min(values), max(values)
    code = "q"
    if lo >= 0:
        for c in _CODES:
            if hi < 1 << (8 * array.array(c).itemsize):
                code = c
                break
    arr = array.array(code, values)
    if sys.byteorder != "little":  # pragma: no cover
        arr.byteswap()
    return struct.pack("<cI", code.encode(), len(arr)), arr.tobytes()


#: columns holding at most this many values in all travel pickled (``b"p"``): for the
#: tiny plans of many-rank layouts, 10x cheaper to pack and 4x to unpack than arrays
_SMALL = 48


def _pack(columns: Sequence[Sequence[int] | bytes]) -> bytes:
    """Columns of non-negative ints (or bytes) in one ``bytes``; ``zlib`` when it pays.

    Small columns are pickled as a tuple of lists (``b"p"``; protocol 3, which
    needs no global: :func:`_unpack` checks that only lists and bytes came back,
    :func:`check_blob` also that the lists hold only ints).
    """
    if sum(map(len, columns)) <= _SMALL:
        return b"p" + pickle.dumps(tuple(c if isinstance(c, bytes) else list(c) for c in columns), protocol=3)
    parts = [_column(c) for c in columns]
    data = b"".join(h for h, _ in parts) + b"".join(d for _, d in parts)
    if len(data) > 128:
        return b"z" + zlib.compress(data, 1)
    return b"-" + data


def _unpack(blob: bytes, k: int) -> list[Any]:
    """The ``k`` columns :func:`_pack` packed (lists of ints; ``bytes`` for a bytes column)."""
    if blob[:1] == b"p":
        return _unpack_small(blob, k)
    try:
        data = zlib.decompress(blob[1:]) if blob[:1] == b"z" else blob[1:]
        head = struct.unpack_from("<" + "cI" * k, data)
        at = struct.calcsize("<" + "cI" * k)
        out: list[Any] = []
        for code, count in zip(head[::2], head[1::2]):
            if code == b"b":
                out.append(data[at : at + count])
                at += count
                continue
            arr = array.array(code.decode())
            size = arr.itemsize * count
            arr.frombytes(data[at : at + size])
            if sys.byteorder != "little":  # pragma: no cover
                arr.byteswap()
            at += size
            out.append(arr.tolist())
    except (zlib.error, struct.error, ValueError) as exc:
        raise PlanMismatchError(f"dcplan: a compact plan is damaged ({exc}); mixed dcplan versions?") from None
    if at != len(data):
        raise PlanMismatchError("dcplan: a compact plan's columns do not match its data (mixed dcplan versions?)")
    return out


def _unpack_small(blob: bytes, k: int) -> list[Any]:
    """The columns of a ``b"p"`` blob (see :func:`_pack`), checked to be only lists of ints and bytes."""
    try:
        cols = pickle.loads(blob[1:])  # noqa: S301 - protocol 3 from a peer's dcplan; types checked below
    except Exception as exc:
        raise PlanMismatchError(f"dcplan: a compact plan is damaged ({exc!r}); mixed dcplan versions?") from None
    if type(cols) is not tuple or len(cols) != k:
        raise PlanMismatchError("dcplan: a compact plan's columns do not match its data (mixed dcplan versions?)")
    # (the values are checked where they are used; a file's blob by check_blob)
    if not _columns_ok(cols, values=False):
        raise PlanMismatchError("dcplan: a compact plan holds something other than integer columns")
    return list(cols)


_COLUMN_TYPES = frozenset({bytes, list})


def _columns_ok(cols: tuple[Any, ...], values: bool) -> bool:
    """Whether ``cols`` are bytes or lists (of ints only, with ``values``), as :func:`_pack` pickles them."""
    if not all(map(_COLUMN_TYPES.__contains__, map(type, cols))):  # (C-level: once per rank's message)
        return False
    return not values or all(type(v) is int for c in cols if type(c) is list for v in c)


class _NoGlobals(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"a compact plan may not name {module}.{name}")


def check_blob(blob: bytes) -> bytes:
    """``blob`` if it is a well-formed column blob that unpickles no object; else ``ValueError``.

    Blobs from peers arrive inside torch's own pickles, so :func:`_unpack`
    trusts them as much as the message around them. Blobs read from a file (the
    persistent plan store, :mod:`dcplan.save.store`) go through this first: a
    pickled one is parsed with an unpickler that resolves no global, so a
    crafted store file cannot run code.
    """
    if blob[:1] == b"p":
        try:
            cols = _NoGlobals(io.BytesIO(blob[1:])).load()
        except Exception as exc:
            raise ValueError(f"a compact plan blob is damaged or unsafe: {exc}") from None
        if type(cols) is not tuple or not _columns_ok(cols, values=True):
            raise ValueError("a compact plan blob holds something other than integer columns")
    elif blob[:1] not in (b"z", b"-"):
        raise ValueError("a compact plan blob of an unknown kind")
    return blob


def _is_size(x: Any) -> bool:
    return type(x) is torch.Size


def _entry(item: Any) -> tuple[int, tuple[int, ...], Any, int]:
    """(kind, ints, properties, bytes size) of one item; kind ``_RAW`` when it does not fit."""
    if not _SIMPLE or type(item) is not WriteItem or type(item.index) is not MetadataIndex:
        return _RAW, (), None, 0
    idx = item.index
    if type(idx.fqn) is not str or not (idx.index is None or (type(idx.index) is int and idx.index >= 0)):
        return _RAW, (), None, 0
    td = item.tensor_data
    bio = getattr(item, "bytes_io_data", None)
    if td is None:
        if idx.offset is not None:
            return _RAW, (), None, 0
        if bio is None:
            return _BYTES, (), None, -1
        if type(bio) is not BytesIOWriteData or type(bio.nbytes) is not int or bio.nbytes < 0:
            return _RAW, (), None, 0
        if len(dataclasses.fields(bio)) != 1:
            return _RAW, (), None, 0
        return _BYTES, (), None, bio.nbytes
    if bio is not None or type(td) is not TensorWriteData:
        return _RAW, (), None, 0
    chunk = td.chunk
    if type(chunk) is not ChunkStorageMetadata:
        return _RAW, (), None, 0
    size, offs, sizes, ioff = td.size, chunk.offsets, chunk.sizes, idx.offset
    if not (_is_size(size) and _is_size(offs) and _is_size(sizes) and _is_size(ioff)):
        return _RAW, (), None, 0
    nd = len(size)
    if len(offs) != nd or len(sizes) != nd or ioff != offs:
        return _RAW, (), None, 0
    if sizes == size and not any(offs):
        return _WHOLE, tuple(size), td.properties, 0
    return _SHARD, (*size, *offs, *sizes), td.properties, 0


def encode_items(items: Sequence[WriteItem]) -> WirePlan:
    """The compact form of ``items`` (exact: :func:`decode_items` gives equal items back)."""
    fqn_ids: dict[str, int] = {}
    props: list[Any] = []
    prop_ids: dict[int, int] = {}
    kind: list[int] = []
    wtype: list[int] = []
    fid: list[int] = []
    pid: list[int] = []
    ndim: list[int] = []
    hint: list[int] = []
    nbytes: list[int] = []
    ints: list[int] = []
    raw: list[tuple[int, Any]] = []
    for pos, item in enumerate(items):
        k, vals, p, nb = _entry(item)
        kind.append(k)
        if k == _RAW:
            raw.append((pos, item))
            continue
        idx = item.index
        fid.append(fqn_ids.setdefault(idx.fqn, len(fqn_ids)))
        wtype.append(_TYPE_NO[item.type])
        hint.append(-1 if idx.index is None else idx.index)
        if k == _BYTES:
            nbytes.append(nb)
            continue
        i = prop_ids.get(id(p))
        if i is None:
            for j, q in enumerate(props):
                if q == p and type(q) is type(p):
                    i = j
                    break
            else:
                i = len(props)
                props.append(p)
            prop_ids[id(p)] = i
        pid.append(i)
        ndim.append(len(vals) if k == _WHOLE else len(vals) // 3)
        ints.extend(vals)
    names = "\x00".join(fqn_ids).encode("utf-8", "surrogatepass")
    hints = [h + 1 for h in hint] if any(h >= 0 for h in hint) else []
    blob = _pack([kind, wtype, fid, pid, ndim, hints, [n + 1 for n in nbytes], ints, names, [len(fqn_ids)]])
    return WirePlan(n=len(items), blob=blob, props=tuple(map(props_spec, props)), raw=tuple(raw))


def _by_dict_ok() -> bool:
    """Whether the four classes can be built by filling ``__dict__`` (torch 2.4-2.15)."""
    try:
        props = compat.TensorProperties(dtype=torch.float32)
        chunk = ChunkStorageMetadata(offsets=torch.Size([0]), sizes=torch.Size([2]))
        td = TensorWriteData(chunk=chunk, properties=props, size=torch.Size([2]))
        item = WriteItem(index=MetadataIndex("a", torch.Size([0]), 3), type=WriteItemType.TENSOR, tensor_data=td)
        built = _new(
            WriteItem,
            {
                "index": _new(MetadataIndex, {"fqn": "a", "offset": torch.Size([0]), "index": 3}),
                "type": WriteItemType.TENSOR,
                "tensor_data": _new(
                    TensorWriteData,
                    {
                        "chunk": _new(ChunkStorageMetadata, {"offsets": torch.Size([0]), "sizes": torch.Size([2])}),
                        "properties": props,
                        "size": torch.Size([2]),
                    },
                ),
                **({"bytes_io_data": None} if _HAS_BIO else {}),
            },
        )
        return bool(built == item) and set(vars(built)) == set(vars(item))
    except Exception:  # pragma: no cover - a torch whose classes use __slots__
        return False


def _new(cls: type, fields: dict[str, Any]) -> Any:
    obj: Any = object.__new__(cls)
    obj.__dict__.update(fields)
    return obj


_BY_DICT = _SIMPLE and _by_dict_ok()
_CSM, _TWD, _MI, _WI = ChunkStorageMetadata, TensorWriteData, MetadataIndex, WriteItem


def _make_item(fqn: str, offset: Any, hint: Any, wtype: Any, td: Any, bio: Any) -> WriteItem:
    if _BY_DICT:
        index = _new(MetadataIndex, {"fqn": fqn, "offset": offset, "index": hint})
        fields = {"index": index, "type": wtype, "tensor_data": td}
        if _HAS_BIO:
            fields["bytes_io_data"] = bio
        return _new(WriteItem, fields)  # type: ignore[no-any-return]
    kw: dict[str, Any] = {"index": MetadataIndex(fqn, offset, hint), "type": wtype, "tensor_data": td}
    if _HAS_BIO:
        kw["bytes_io_data"] = bio
    return WriteItem(**kw)


def _make_td(size: Any, offs: Any, sizes: Any, props: Any) -> Any:
    if _BY_DICT:
        chunk = _new(ChunkStorageMetadata, {"offsets": offs, "sizes": sizes})
        return _new(TensorWriteData, {"chunk": chunk, "properties": props, "size": size})
    return TensorWriteData(chunk=ChunkStorageMetadata(offsets=offs, sizes=sizes), properties=props, size=size)


def _props(spec: Any, memo: dict[Any, Any] | None) -> Any:
    """:func:`props_object`, once per spec string in a decoding pass when ``memo`` is shared."""
    if memo is None or type(spec) is not str:
        return props_object(spec)
    key = ("props", spec)  # (no shape or name key is such a tuple)
    p = memo.get(key)
    if p is None:
        p = memo[key] = props_object(spec)
    return p


def decode_items(wire: WirePlan, memo: dict[Any, Any] | None = None) -> list[WriteItem]:
    """The items :func:`encode_items` was given (equal, not the same objects).

    :param memo: a dict shared by the calls of one decoding pass (the plans one
        coordinator gathered): equal fqn strings and shapes are then one object
        each across those plans (an FSDP save's ranks send the same names and
        chunk shapes), which saves memory and makes key comparisons identity
        checks. Only immutable values (``str``, ``torch.Size``) are shared.
    """
    if not isinstance(wire, WirePlan) or wire.version != WIRE_VERSION:
        raise PlanMismatchError(
            "dcplan: a rank sent a plan in another wire format; install the same dcplan version on every rank"
        )
    kinds, wt_nos, fids, pids, ndims, hints_arr, nbytes1, ints, names_b, (nnames,) = _unpack(wire.blob, 10)
    names = names_b.decode("utf-8", "surrogatepass").split("\x00") if nnames else []
    if len(names) != nnames:
        raise PlanMismatchError("dcplan: a compact plan's fqn table is damaged")
    if memo is None:
        memo = {}
    else:
        names = list(map(memo.setdefault, names, names))  # one str object per name across the pass
    wtypes = list(map(_TYPES.__getitem__, wt_nos))
    hints: list[Any] = [None if h == 0 else h - 1 for h in hints_arr] if hints_arr else [None] * len(fids)
    nbytes = [n - 1 for n in nbytes1] if nbytes1 else nbytes1
    raw = dict(wire.raw) if wire.raw else {}
    props = tuple(_props(p, memo) for p in wire.props)
    sizes_cache: dict[Any, Any] = memo  # (tuple keys: shapes; str keys: names)
    zeros: dict[Any, Any] = memo  # (int keys: all-zero offsets of that rank)
    out: list[WriteItem] = []
    append = out.append
    fast, new = _BY_DICT, object.__new__
    e = t = b = ip = 0
    for pos, k in enumerate(kinds):
        if k == _RAW:
            append(raw[pos])
            continue
        fqn, wt, hint = names[fids[e]], wtypes[e], hints[e]
        e += 1
        if k == _BYTES:
            nb = nbytes[b]
            b += 1
            bio = None if nb < 0 or not _HAS_BIO else BytesIOWriteData(nbytes=nb)
            append(_make_item(fqn, None, hint, wt, None, bio))
            continue
        nd = ndims[t]
        p = props[pids[t]]
        t += 1
        # every shape is a torch.Size shared by the items of this call that have it (equal
        # values, one object: cheaper to build, and less memory where many items share shapes)
        key = tuple(ints[ip : ip + nd])
        size = sizes_cache.get(key)
        if size is None:
            size = sizes_cache[key] = torch.Size(key)
        ip += nd
        if k == _WHOLE:
            offs = zeros.get(nd)
            if offs is None:
                offs = zeros[nd] = torch.Size([0] * nd)
            sizes = size
        else:
            key = tuple(ints[ip : ip + nd])
            offs = sizes_cache.get(key)
            if offs is None:
                offs = sizes_cache[key] = torch.Size(key)
            ip += nd
            key = tuple(ints[ip : ip + nd])
            sizes = sizes_cache.get(key)
            if sizes is None:
                sizes = sizes_cache[key] = torch.Size(key)
            ip += nd
        if fast:  # the same objects _make_item/_make_td build, without the calls (hot loop)
            chunk = new(_CSM)
            d = chunk.__dict__
            d["offsets"] = offs
            d["sizes"] = sizes
            td = new(_TWD)
            d = td.__dict__
            d["chunk"] = chunk
            d["properties"] = p
            d["size"] = size
            index = new(_MI)
            d = index.__dict__
            d["fqn"] = fqn
            d["offset"] = offs
            d["index"] = hint
            item = new(_WI)
            d = item.__dict__
            d["index"] = index
            d["type"] = wt
            if _HAS_BIO:
                d["bytes_io_data"] = None
            d["tensor_data"] = td
            append(item)
        else:
            append(_make_item(fqn, offs, hint, wt, _make_td(size, offs, sizes, p), None))
    if len(out) != wire.n:
        raise PlanMismatchError("dcplan: a compact plan decoded to the wrong number of items")
    return out


# ---------------------------------------------------------------- gathered
@attrs.frozen
class LocalMsg:
    """What a rank sends in ``SavePlan.planner_data`` (with ``items=[]``).

    :param payload: the field values of the rank's ``RankPayload``, in order
        (a tuple: no class or field names on the wire); ``mapping`` and
        ``agreement`` are left out (``None``, ``()``) when ``ref`` or
        ``meta_ref`` is set.
    :param wire: the rank's items, or ``None`` when ``ref`` is set.
    :param ref: the lowest rank whose plan, mapping and agreement are exactly
        this rank's (agreed by :mod:`dcplan.save.exchange`).
    :param meta_ref: the lowest rank whose mapping and agreement are this
        rank's (its items differ).
    :param stored: the coordinator's persistent plan store holds this save's
        plan (:mod:`dcplan.save.store`): nothing else is sent.
    """

    payload: tuple[Any, ...]
    wire: WirePlan | None = None
    ref: int | None = None
    meta_ref: int | None = None
    stored: bool = False

    def __reduce__(self) -> tuple[Any, ...]:
        return (LocalMsg, (self.payload, self.wire, self.ref, self.meta_ref, self.stored))


def _values(payload: Any, strip: bool) -> tuple[Any, ...]:
    if strip:
        payload = attrs.evolve(payload, mapping=None, agreement=())
    return attrs.astuple(payload, recurse=False)


def pack_local(
    plan: SavePlan,
    payload: Any,
    wire: WirePlan | None,
    ref: int | None,
    stored: bool = False,
    meta_ref: int | None = None,
) -> SavePlan:
    """The plan to return from ``create_local_plan``: no items, a :class:`LocalMsg`."""
    if stored:
        msg = LocalMsg(payload=_values(payload, True), stored=True)
    elif ref is not None:
        msg = LocalMsg(payload=_values(payload, True), ref=ref)
    else:
        wire = encode_items(plan.items) if wire is None else wire
        msg = LocalMsg(payload=_values(payload, meta_ref is not None), wire=wire, meta_ref=meta_ref)
    return compat.replace_plan(plan, items=[], planner_data=msg)


def unpack_gathered(all_plans: Sequence[SavePlan], payload_cls: Any) -> list[SavePlan]:
    """Full plans (items and ``payload_cls`` payloads) from what the coordinator gathered.

    Ranks that sent a reference share the referenced rank's item list (one
    decode per distinct plan); plans that are not compact pass through.
    """
    with paused_gc():
        return _unpack_gathered(all_plans, payload_cls)


def _source(all_plans: Sequence[SavePlan], r: int, q: int) -> None:
    if not (0 <= q < r) or not isinstance(all_plans[q].planner_data, LocalMsg):
        raise PlanMismatchError(
            f"dcplan: rank {r} referred to rank {q}'s plan, which the coordinator did not receive; "
            "the planner's process group differs from the one dcp.save uses. Pass the same "
            "process_group to dcplan.SavePlanner and dcp.save"
        )


def _unpack_gathered(all_plans: Sequence[SavePlan], payload_cls: Any) -> list[SavePlan]:
    out: list[SavePlan] = []
    memo: dict[Any, Any] = {}  # shared names and shapes (see decode_items)
    names = [f.name for f in attrs.fields(payload_cls)]
    at_mapping, at_agreement = names.index("mapping"), names.index("agreement")
    for r, plan in enumerate(all_plans):
        msg = plan.planner_data
        if not isinstance(msg, LocalMsg):
            out.append(plan)
            continue
        q = msg.ref if msg.ref is not None else msg.meta_ref
        if q is not None:
            _source(all_plans, r, q)
            src = out[q].planner_data
            values = list(msg.payload)  # the referenced rank's mapping and agreement (cheaper than evolve)
            values[at_mapping], values[at_agreement] = src.mapping, src.agreement
            payload = payload_cls(*values)
        else:
            payload = payload_cls(*msg.payload)
        if msg.ref is not None:
            out.append(compat.replace_plan(plan, items=out[msg.ref].items, planner_data=payload))
            continue
        if msg.wire is None:
            raise PlanMismatchError(
                f"dcplan: rank {r} sent {'a stored-plan marker' if msg.stored else 'neither a plan nor a reference'}"
                " while other ranks sent plans; use the same plan_cache_dir and process group on every rank"
            )
        out.append(compat.replace_plan(plan, items=decode_items(msg.wire, memo), planner_data=payload))
    return out


# ---------------------------------------------------------------- scattered
@attrs.frozen
class FinalMsg:
    """A rank's final plan as the coordinator scatters it (in ``planner_data``, ``items=[]``).

    :param planner_data: the final plan's own ``planner_data``.
    :param n: number of items.
    :param blob: three columns: ``pos``, each item's position in the local plan
        the rank sent; ``hint``, its index hint + 1 (0: none; empty: no hints);
        ``where``, positions (in the final plan) of the items in ``extra``.
    :param extra: items that are not a local item with a new hint.
    """

    planner_data: Any
    n: int
    blob: bytes
    extra: WirePlan | None = None
    version: int = WIRE_VERSION

    def __reduce__(self) -> tuple[Any, ...]:
        return (FinalMsg, (self.planner_data, self.n, self.blob, self.extra, self.version))


_KEY = operator.attrgetter("index.fqn", "index.offset")
_SIG = operator.attrgetter("__class__", "type", "tensor_data", *(["bytes_io_data"] if _HAS_BIO else []))
_HINT = operator.attrgetter("index.index")


class _Absent:
    """Stands for a local item that does not exist: matches nothing."""

    tensor_data = type = bytes_io_data = object()


_ABSENT = _Absent()


def _final_msg(final: SavePlan, local: Sequence[WriteItem], lookup: dict[Any, int]) -> SavePlan:
    items = final.items
    pos: list[Any] = list(map(lookup.get, map(_KEY, items)))
    base: list[Any]
    if None in pos or not _SIMPLE:
        base = [local[p] if p is not None else _ABSENT for p in pos] if _SIMPLE else [_ABSENT] * len(items)
    else:
        base = list(map(local.__getitem__, pos))
    # an item is "the local item at pos with a new hint" when its class, type, tensor data (and
    # bytes size) are the local item's: identical objects short-circuit the comparison
    ok = list(map(operator.eq, map(_SIG, items), map(_SIG, base)))
    where = [i for i, o in enumerate(ok) if not o] if False in ok else []
    extra = encode_items([items[i] for i in where]) if where else None
    hints = list(map(_HINT, items))
    try:
        hint_col = [0 if h is None else h + 1 for h in hints] if hints.count(None) != len(hints) else []
        blob = _pack([[p if o else 0 for p, o in zip(pos, ok)] if where else pos, hint_col, where])
    except (TypeError, OverflowError):  # a hint we cannot express: send the plan as it is
        return final
    msg = FinalMsg(planner_data=final.planner_data, n=len(items), blob=blob, extra=extra)
    return compat.replace_plan(final, items=[], planner_data=msg)


def pack_final(final_plans: Sequence[SavePlan], local_plans: Sequence[SavePlan]) -> list[SavePlan]:
    """Compact forms of the final plans, against the local plans the ranks sent.

    ``local_plans[r]`` must list rank ``r``'s items in the order it sent them
    (what :func:`unpack_gathered` returned). Plans without items pass through.
    """
    with paused_gc():
        return _pack_final(final_plans, local_plans)


def _pack_final(final_plans: Sequence[SavePlan], local_plans: Sequence[SavePlan]) -> list[SavePlan]:
    lookups: dict[int, dict[Any, int]] = {}  # per item list of this call (ranks sharing a plan share it)
    out = []
    for final, local in zip(final_plans, local_plans):
        if not final.items:
            out.append(final)
            continue
        litems = local.items
        lookup = lookups.get(id(litems))
        if lookup is None:
            lookup = lookups[id(litems)] = dict(zip(map(_KEY, litems), range(len(litems))))
        out.append(_final_msg(final, litems, lookup))
    return out


def _with_hint(item: WriteItem, hint: int | None) -> WriteItem:
    if item.index.index == hint:
        return item
    if hint is not None:
        return compat.with_index_hint(item, hint)
    return dataclasses.replace(item, index=dataclasses.replace(item.index, index=None))


def unpack_final(plan: SavePlan, local_items: Sequence[WriteItem]) -> SavePlan:
    """The ordinary final plan from a scattered one (``local_items``: what this rank sent)."""
    msg = plan.planner_data
    if not isinstance(msg, FinalMsg):
        return plan
    if msg.version != WIRE_VERSION:
        raise PlanMismatchError("dcplan: the coordinator runs another dcplan version; install the same everywhere")
    pos, hints_l, where = _unpack(msg.blob, 3)
    hints: list[Any] = [None if h == 0 else h - 1 for h in hints_l] if hints_l else [None] * msg.n
    skip = set(where)
    if any(p >= len(local_items) for i, p in enumerate(pos) if i not in skip):
        raise PlanMismatchError(
            "dcplan: the coordinator's final plan refers to items this rank did not send; the planner's "
            "process group differs from the one dcp.save uses"
        )
    items: list[WriteItem] = [
        _with_hint(local_items[p], h) if i not in skip else None  # type: ignore[misc]
        for i, (p, h) in enumerate(zip(pos, hints))
    ]
    if where and msg.extra is not None:
        for i, it in zip(where, decode_items(msg.extra)):
            items[i] = it
    return compat.replace_plan(plan, items=items, planner_data=msg.planner_data)


def all_stored(all_plans: Sequence[SavePlan]) -> bool:
    """Whether every rank only sent a stored-plan marker."""
    return bool(all_plans) and all(
        isinstance(p.planner_data, LocalMsg) and p.planner_data.stored for p in all_plans
    )


def is_compact(all_plans: Sequence[SavePlan]) -> bool:
    """Whether the ranks sent compact plans (they then read compact final plans too)."""
    return any(isinstance(p.planner_data, LocalMsg) for p in all_plans)
