"""Everything that differs between torch 2.4 and 2.15, in one place.

Rule: detect features (``hasattr``, dataclass fields, signatures), never compare
version strings. The rest of dcplan imports torch internals only from here.
See ``docs/compatibility.md`` for the list of differences handled.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib
import inspect
import logging
from collections.abc import Sequence
from typing import Any, TypeVar

import torch
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint import default_planner as _dp
from torch.distributed.checkpoint import planner_helpers as _ph
from torch.distributed.checkpoint._nested_dict import flatten_state_dict, unflatten_state_dict
from torch.distributed.checkpoint._sharded_tensor_utils import _flatten_sharded_tensors
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadPlan,
    ReadItem,
    SavePlan,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.utils import find_state_dict_object

__all__ = [
    "BytesStorageMetadata",
    "DefaultLoadPlanner",
    "DefaultSavePlanner",
    "ChunkStorageMetadata",
    "DTensor",
    "LoadPlan",
    "Metadata",
    "MetadataIndex",
    "ReadItem",
    "SavePlan",
    "TensorProperties",
    "TensorStorageMetadata",
    "TensorWriteData",
    "WriteItem",
    "WriteItemType",
    "HAS_USABLE",
    "HAS_BYTES_IO_DATA",
    "HAS_METADATA_VERSION",
    "HAS_STORAGE_META",
    "HAS_DERIVED_VERSION",
    "HAS_STRIDES",
    "flatten_state_dict",
    "unflatten_state_dict",
    "flatten_sharded_tensors",
    "set_element",
    "find_state_dict_object",
    "narrow_tensor_by_index",
]

# -- DTensor: torch.distributed.tensor from 2.5, torch.distributed._tensor before.
try:
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - torch 2.4
    from torch.distributed._tensor import DTensor  # type: ignore[no-redef]


@functools.cache
def _fields(cls: type) -> frozenset[str]:
    return frozenset(f.name for f in dataclasses.fields(cls))


#: ``SavePlan.usable`` (2.7+).
HAS_USABLE = "usable" in _fields(SavePlan)
#: ``WriteItem.bytes_io_data`` and ``BytesIOWriteData`` (2.8+).
HAS_BYTES_IO_DATA = "bytes_io_data" in _fields(WriteItem)
#: ``Metadata.version`` (2.9+).
HAS_METADATA_VERSION = "version" in _fields(Metadata)
#: ``Metadata.storage_meta`` (2.4+).
HAS_STORAGE_META = "storage_meta" in _fields(Metadata)
#: ``TensorProperties.strides`` (2.15+): such ``.metadata`` files do not load on <= 2.14.
HAS_STRIDES = "strides" in _fields(TensorProperties)

try:
    from torch.distributed.checkpoint import _version as _version_mod
except ImportError:  # pragma: no cover - torch 2.4
    _version_mod = None  # type: ignore[assignment]
#: ``checkpoint._version._derived_version`` switch for 2.3-format keys (2.5+).
HAS_DERIVED_VERSION = _version_mod is not None and hasattr(_version_mod, "_derived_version")

flatten_sharded_tensors = _flatten_sharded_tensors


# ---------------------------------------------------------------- plans
def plan_usable(plan: SavePlan) -> bool:
    """``plan.usable`` where it exists; plans are always usable before 2.7."""
    return bool(getattr(plan, "usable", True))


_PlanT = TypeVar("_PlanT", SavePlan, LoadPlan)


def _plan_copy_by_dict(cls: type) -> bool:
    """Whether a ``cls`` (SavePlan/LoadPlan) copy can be made by copying ``__dict__``:
    a plain dataclass without ``__post_init__`` or ``__slots__`` (torch 2.4-2.15)."""
    if hasattr(cls, "__post_init__") or hasattr(cls, "__slots__"):
        return False
    try:
        plan = cls([])
    except Exception:  # pragma: no cover
        return False
    return set(getattr(plan, "__dict__", {})) == set(_fields(cls))


_PLAN_BY_DICT = {c: _plan_copy_by_dict(c) for c in (SavePlan, LoadPlan)}


_PLAN_FIELDS = {c: _fields(c) for c in (SavePlan, LoadPlan)}


def replace_plan(plan: _PlanT, **changes: Any) -> _PlanT:
    """``dataclasses.replace`` that drops fields this torch does not have (``usable``: 2.7+)."""
    cls = type(plan)
    names = _PLAN_FIELDS.get(cls)
    if names is None:
        names = _fields(cls)  # type: ignore[arg-type]
    if not names.issuperset(changes):
        changes = {k: v for k, v in changes.items() if k in names}
    if _PLAN_BY_DICT.get(cls, False):  # 10x cheaper than dataclasses.replace (per rank, at 16k ranks)
        new = object.__new__(cls)
        d = new.__dict__
        d.update(plan.__dict__)
        d.update(changes)
        return new  # type: ignore[no-any-return]
    return dataclasses.replace(plan, **changes)


def make_write_item(
    index: MetadataIndex,
    type: WriteItemType,
    tensor_data: TensorWriteData | None = None,
    nbytes: int | None = None,
) -> WriteItem:
    """Build a ``WriteItem`` with keywords only (``bytes_io_data`` moved fields in 2.8)."""
    kwargs: dict[str, Any] = {"index": index, "type": type, "tensor_data": tensor_data}
    if nbytes is not None and HAS_BYTES_IO_DATA:
        from torch.distributed.checkpoint.planner import BytesIOWriteData

        kwargs["bytes_io_data"] = BytesIOWriteData(nbytes=nbytes)
    return WriteItem(**kwargs)


def _items_copy_by_dict() -> bool:
    """Whether ``WriteItem`` and ``MetadataIndex`` keep every field in the instance ``__dict__``.

    True on torch 2.4-2.15 (plain frozen dataclasses). Then a copy with one
    field changed can be made by a ``__dict__`` update, 20x cheaper than
    ``dataclasses.replace``; a torch that adds ``__slots__`` gets the replace.
    """
    try:
        idx = MetadataIndex("x", (0,), 0)
        item = make_write_item(idx, WriteItemType.TENSOR)
    except Exception:  # pragma: no cover - a constructor we do not know
        return False
    d_idx, d_item = getattr(idx, "__dict__", None), getattr(item, "__dict__", None)
    return (
        isinstance(d_idx, dict)
        and isinstance(d_item, dict)
        and {"fqn", "index", "offset"} <= set(d_idx)
        and {"index", "type", "tensor_data"} <= set(d_item)
    )


#: ``WriteItem``/``MetadataIndex`` fields live in ``__dict__`` (see :func:`with_index_hint`)
ITEMS_COPY_BY_DICT = _items_copy_by_dict()


def with_index_hint(item: WriteItem, hint: int) -> WriteItem:
    """A copy of ``item`` whose ``index.index`` is ``hint``; every other field kept."""
    if ITEMS_COPY_BY_DICT:
        new_index = object.__new__(MetadataIndex)
        new_index.__dict__.update(item.index.__dict__)
        new_index.__dict__["index"] = hint
        new = object.__new__(item.__class__)
        new.__dict__.update(item.__dict__)
        new.__dict__["index"] = new_index
        return new
    return dataclasses.replace(item, index=dataclasses.replace(item.index, index=hint))


def bytes_item_size(item: WriteItem) -> int | None:
    """The serialized size recorded on a BYTE_IO item (2.8+), else ``None``."""
    data = getattr(item, "bytes_io_data", None)
    return getattr(data, "nbytes", None) if data is not None else None


def with_bytes_size(item: WriteItem, nbytes: int) -> WriteItem:
    if not HAS_BYTES_IO_DATA:
        return item
    from torch.distributed.checkpoint.planner import BytesIOWriteData

    return dataclasses.replace(item, bytes_io_data=BytesIOWriteData(nbytes=nbytes))


def create_write_items(fqn: str, obj: Any) -> list[WriteItem]:
    """torch's own per-object write items (tensor, DTensor, ShardedTensor, bytes)."""
    return list(_ph._create_write_items(fqn, obj))


def create_read_items(fqn: str, md: Any, obj: Any) -> list[ReadItem]:
    return list(_ph._create_read_items(fqn, md, obj))


def dtensor_on_this_rank(obj: Any) -> bool:
    """False for a DTensor whose (sub-)mesh does not include this rank."""
    if isinstance(obj, DTensor):
        return obj.device_mesh.get_coordinate() is not None
    return True


def init_state_dict(state_dict: dict[str, Any]) -> None:
    """Materialise meta tensors like torch's loader does (``_init_state_dict``, 2.3+)."""
    fn = getattr(_ph, "_init_state_dict", None)
    if fn is not None:
        fn(state_dict)


def torch_dedup_save_plans(all_plans: Sequence[SavePlan], save_to_lowest_rank: bool = False) -> list[SavePlan]:
    """torch's ``dedup_save_plans`` without its 2.3-2.7 habit of mutating the input."""
    from torch.distributed.checkpoint._dedup_save_plans import dedup_save_plans

    plans = list(all_plans)  # 2.3-2.7 assign into the list they are given
    if "save_to_lowest_rank" in inspect.signature(dedup_save_plans).parameters:
        return list(dedup_save_plans(plans, save_to_lowest_rank))
    if save_to_lowest_rank:  # pragma: no cover - torch 2.3
        raise NotImplementedError("this torch has no save_to_lowest_rank")
    return list(dedup_save_plans(plans))


def torch_default_save_planner(**kwargs: Any) -> Any:
    """``DefaultSavePlanner`` with the keyword arguments this torch accepts."""
    params = inspect.signature(_dp.DefaultSavePlanner.__init__).parameters
    return _dp.DefaultSavePlanner(**{k: v for k, v in kwargs.items() if k in params})


def torch_default_load_planner(**kwargs: Any) -> Any:
    params = inspect.signature(_dp.DefaultLoadPlanner.__init__).parameters
    return _dp.DefaultLoadPlanner(**{k: v for k, v in kwargs.items() if k in params})


def torch_validate_global_plan(global_plan: Sequence[SavePlan], metadata: Metadata) -> list[str]:
    """torch's ``_validate_global_plan`` normalised to a list of errors.

    Up to 2.11 it returns a bool (``True`` = valid); from 2.12 a list of messages.
    """
    result = _dp._validate_global_plan(list(global_plan), metadata)
    if isinstance(result, bool):
        return [] if result else ["torch: invalid global plan"]
    return list(result)


def _load_works_on_subgroup() -> bool:
    """torch 2.4's ``dcp.load`` sizes its key gather by the *global* world size (fixed in 2.5),
    so loading with a ``process_group`` smaller than the world fails with ``TypeError``."""
    from torch.distributed.checkpoint import utils as _utils

    fn = getattr(_utils, "_all_gather_keys", None)
    if fn is None:
        return True
    try:
        src = inspect.getsource(fn)
    except (OSError, TypeError):  # pragma: no cover - sources not shipped
        return True
    return "get_world_size()" not in src


#: ``dcp.load(..., process_group=<a sub-group>)`` works (2.5+).
DCP_LOAD_ON_SUBGROUP = _load_works_on_subgroup()


_SINGLE_PLAN_COVERAGE: list[bool] = []


def torch_checks_single_plan_coverage() -> bool:
    """Whether torch's validator demands full coverage from a one-plan global plan (before 2.9).

    From 2.9 the volume check runs only ``if len(global_plan) > 1`` (rank-local saves);
    dcplan's validator follows 2.9. Detected once by validating half a tensor in one plan.
    """
    if not _SINGLE_PLAN_COVERAGE:
        half = ChunkStorageMetadata(offsets=torch.Size([0]), sizes=torch.Size([2]))
        item = make_write_item(
            index=MetadataIndex("w", torch.Size([0])),
            type=WriteItemType.SHARD,
            tensor_data=TensorWriteData(chunk=half, properties=TensorProperties(), size=torch.Size([4])),
        )
        md = Metadata(
            state_dict_metadata={"w": TensorStorageMetadata(TensorProperties(), torch.Size([4]), [half])}
        )
        log = logging.getLogger(_dp.__name__)  # torch logs the failed volume check as a warning
        level = log.level
        log.setLevel(logging.ERROR)
        try:
            _SINGLE_PLAN_COVERAGE.append(bool(torch_validate_global_plan([SavePlan([item])], md)))
        finally:
            log.setLevel(level)
    return _SINGLE_PLAN_COVERAGE[0]


def torch_create_global_plan(planner: Any, all_plans: Sequence[SavePlan]) -> tuple[list[SavePlan], Metadata]:
    """Run torch's coordinator step on a copy of ``all_plans`` (benchmarks)."""
    plans = copy.copy(list(all_plans))
    return planner.create_global_plan(plans)


# ---------------------------------------------------------------- metadata
def metadata_version(md: Metadata) -> str | None:
    return getattr(md, "version", None)


def metadata_storage_meta(md: Metadata) -> Any:
    return getattr(md, "storage_meta", None)


def old_format_flatten(state_dict: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """Flatten with torch 2.3's key rules (for 2.3-era checkpoints), if this torch can.

    Returns ``None`` on torch 2.4, which has no such fallback.
    """
    if not HAS_DERIVED_VERSION:
        return None
    prev = _version_mod._derived_version  # type: ignore[union-attr]
    _version_mod._derived_version = "2_3"  # type: ignore[union-attr]
    try:
        return flatten_state_dict(state_dict)
    finally:
        _version_mod._derived_version = prev  # type: ignore[union-attr]


def import_object(path: str) -> Any:
    """Import ``"package.module.Qualname"``."""
    module, _, qual = path.rpartition(".")
    while module:
        try:
            obj: Any = importlib.import_module(module)
        except ImportError:
            module, _, head = module.rpartition(".")
            qual = f"{head}.{qual}"
            continue
        for part in qual.split("."):
            obj = getattr(obj, part)
        return obj
    raise ImportError(f"cannot import {path!r}")


# imported (not assigned) so that type checkers accept them as base classes
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner  # noqa: E402,I001


# ---------------------------------------------------------------- DTensor API
def dtensor_placements() -> tuple[Any, Any]:
    """``(Replicate, Shard)`` placement classes (``torch.distributed.tensor`` from 2.5)."""
    try:
        from torch.distributed.tensor import Replicate, Shard
    except ImportError:  # pragma: no cover - torch 2.4
        from torch.distributed._tensor import Replicate, Shard  # type: ignore[no-redef]
    return Replicate, Shard


def distribute_tensor(tensor: torch.Tensor, mesh: Any, placements: Any) -> Any:
    try:
        from torch.distributed.tensor import distribute_tensor as _dt
    except ImportError:  # pragma: no cover - torch 2.4
        from torch.distributed._tensor import distribute_tensor as _dt  # type: ignore[no-redef]
    return _dt(tensor, mesh, placements)


# ---------------------------------------------------------------- safe loading (dcplan.load.safe)
def weights_only_load(fileobj: Any, extra_globals: Sequence[Any] = ()) -> Any:
    """``torch.load(weights_only=True)`` that also admits ``extra_globals`` for this call.

    torch 2.5+ has the ``torch.serialization.safe_globals`` context manager; 2.4 only has the
    process-wide ``add_safe_globals`` list, which is extended and restored around the call.
    """
    ser = torch.serialization
    extra = list(extra_globals)
    if not _safe_globals_take_names():  # 2.4/2.5: entries must be bare objects (named by __module__)
        extra = [e[0] if isinstance(e, tuple) else e for e in extra]
    ctx = getattr(ser, "safe_globals", None)
    if ctx is not None:
        with ctx(extra):
            return torch.load(fileobj, weights_only=True)
    if not extra:  # pragma: no cover - torch 2.4
        return torch.load(fileobj, weights_only=True)
    prev = list(ser.get_safe_globals())  # pragma: no cover - torch 2.4
    ser.add_safe_globals(extra)  # pragma: no cover - torch 2.4
    try:  # pragma: no cover - torch 2.4
        return torch.load(fileobj, weights_only=True)
    finally:  # pragma: no cover - torch 2.4
        ser.clear_safe_globals()
        ser.add_safe_globals(prev)


_TAKES_NAMES: list[bool] = []


def _safe_globals_take_names() -> bool:
    """Whether safe-globals entries may be ``(obj, "module.name")`` pairs (2.6+)."""
    if not _TAKES_NAMES:
        try:
            from torch import _weights_only_unpickler as wou

            src = inspect.getsource(wou._get_user_allowed_globals)
            _TAKES_NAMES.append("tuple" in src)
        except (AttributeError, OSError, TypeError):  # pragma: no cover - no source: be conservative
            _TAKES_NAMES.append(False)
    return _TAKES_NAMES[0]


def unsafe_globals_in(fileobj: Any) -> list[str] | None:
    """The globals a ``torch.save`` payload needs beyond torch's defaults (2.5+), else ``None``."""
    fn = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if fn is None:  # pragma: no cover - torch 2.4
        return None
    return list(fn(fileobj))


def metadata_file_path(reader: Any, rank: int | None = None) -> Any:
    """Where a ``FileSystemReader`` reads ``.metadata`` from (``_get_metadata_path`` is 2.6+)."""
    get = getattr(reader, "_get_metadata_path", None)
    if get is not None:
        return get(rank)
    return reader.fs.concat_path(reader.path, ".metadata")  # pragma: no cover - older torch


def finish_read_metadata(reader: Any, metadata: Metadata) -> Metadata:
    """What torch's ``FileSystemReader.read_metadata`` does after unpickling (``storage_meta``, 2.4+)."""
    if HAS_STORAGE_META and hasattr(reader, "load_id"):
        from torch.distributed.checkpoint.metadata import StorageMeta

        storage_meta = getattr(metadata, "storage_meta", None)
        if storage_meta is None:
            storage_meta = metadata.storage_meta = StorageMeta()
        storage_meta.load_id = reader.load_id
    return metadata



def new_storage_meta(checkpoint_id: Any, save_id: str) -> Any:
    """A ``StorageMeta(checkpoint_id, save_id)`` (2.4+), or ``None`` where torch has none."""
    if not HAS_STORAGE_META:  # pragma: no cover - torch < 2.4
        return None
    from torch.distributed.checkpoint.metadata import StorageMeta

    return StorageMeta(checkpoint_id=checkpoint_id, save_id=save_id)


def stamp_metadata(metadata: Metadata, storage_meta: Any) -> None:
    """What torch's ``FileSystemWriter.finish`` records besides ``storage_data``.

    ``Metadata.version`` (the DCP format version, 2.9+) and ``storage_meta`` (2.4+), where
    this torch's ``Metadata`` has those fields.
    """
    if HAS_METADATA_VERSION:
        from torch.distributed.checkpoint import filesystem as fs_mod

        version = getattr(fs_mod, "CURRENT_DCP_VERSION", None)
        if version is not None:
            metadata.version = version
    if HAS_STORAGE_META:
        metadata.storage_meta = storage_meta


def dcp_call_kwargs(fn: Any, process_group: Any) -> dict[str, Any]:
    """``process_group`` and, where ``fn`` (``dcp.save``/``load``/``async_save``) takes it, ``no_dist``.

    ``no_dist`` is a parameter from 2.7 (``async_save``: 2.9); before, dcp infers it from
    ``dist.is_initialized()``, which is what this passes where it can.
    """
    import torch.distributed as dist

    kwargs: dict[str, Any] = {"process_group": process_group}
    try:
        params = inspect.signature(inspect.unwrap(fn)).parameters
    except (TypeError, ValueError):  # pragma: no cover - a C or oddly wrapped function
        params = {}  # type: ignore[assignment]
    if "no_dist" in params:
        kwargs["no_dist"] = not (dist.is_available() and dist.is_initialized())
    return kwargs


def checkpoint_failures(exc: BaseException) -> dict[int, BaseException]:
    """The per-rank exceptions inside torch's ``CheckpointException`` (``{}`` for anything else).

    ``failures`` maps rank to ``(exception, traceback)`` (a ``WrappedException``) in 2.4+.
    """
    failures = getattr(exc, "failures", None)
    if not isinstance(failures, dict):
        return {}
    out: dict[int, BaseException] = {}
    for rank, wrapped in failures.items():
        inner = wrapped[0] if isinstance(wrapped, tuple) and wrapped else getattr(wrapped, "exception", wrapped)
        if isinstance(inner, BaseException):
            out[int(rank)] = inner
    return out

# ---------------------------------------------------------------- .metadata written by a newer torch
#: How many fields this torch's ``TensorProperties`` pickles (5 up to 2.14, 6 with strides from 2.15).
TENSOR_PROPERTIES_FIELDS = len(TensorProperties().__getstate__())


def newer_metadata_message(n_fields: int) -> str:
    """Why a ``.metadata`` with ``n_fields``-field ``TensorProperties`` cannot be read here, and what to do."""
    return (
        f"this checkpoint's .metadata was written by a newer torch (>= 2.15: its TensorProperties carry "
        f"{n_fields} fields, strides included) and torch {torch.__version__} reads only the "
        f"{TENSOR_PROPERTIES_FIELDS}-field format of torch <= 2.14. Load it with torch >= 2.15 "
        f"(pip install 'torch>=2.15'), or save it with torch <= 2.14"
    )


#: whether :func:`install_metadata_format_guard` is active (set when it runs)
METADATA_FORMAT_GUARD = False


def install_metadata_format_guard() -> bool:
    """Make torch <= 2.14 refuse a 2.15 ``.metadata`` with a dcplan error.

    torch <= 2.14 unpacks exactly five ``TensorProperties`` fields, so a 2.15 checkpoint
    fails deep in unpickling with ``ValueError: too many values to unpack``, on every
    rank, whichever reader is used. This wraps ``TensorProperties.__setstate__`` so such
    a state raises :class:`dcplan.errors.MetadataVersionError` (a ``ValueError``) that
    names both versions and the fix. States torch can read go to torch's own
    ``__setstate__`` unchanged. ``import dcplan`` installs it (explicitly, in
    ``dcplan/__init__.py``); idempotent; a no-op on torch >= 2.15 (which reads both
    formats).

    :returns: whether the guard is active.
    """
    global METADATA_FORMAT_GUARD
    METADATA_FORMAT_GUARD = _install_metadata_format_guard()
    return METADATA_FORMAT_GUARD


def _install_metadata_format_guard() -> bool:
    if HAS_STRIDES:
        return False
    current = TensorProperties.__dict__.get("__setstate__")
    if current is None:  # pragma: no cover - every torch from 2.2 to 2.14 defines it
        return False
    if getattr(current, "_dcplan_guard", False):
        return True
    known = TENSOR_PROPERTIES_FIELDS

    def __setstate__(self: Any, state: Any) -> None:
        if isinstance(state, tuple) and len(state) > known:
            from dcplan.errors import MetadataVersionError

            msg = newer_metadata_message(len(state))
            # torch 2.9-2.11's dcp.load swallows any read_metadata exception and then raises
            # "AssertionError: metadata is None": log the reason too, so every rank shows it.
            logging.getLogger("dcplan").error("dcplan: %s", msg)
            raise MetadataVersionError(msg)
        current(self, state)

    __setstate__._dcplan_guard = True  # type: ignore[attr-defined]
    __setstate__.__wrapped__ = current  # type: ignore[attr-defined]
    __setstate__.__doc__ = current.__doc__
    TensorProperties.__setstate__ = __setstate__  # type: ignore[method-assign]
    return True



# ---------------------------------------------------------------- the running dcp.save
_FS_MODULE = "torch.distributed.checkpoint.filesystem"


def _writer_ignores_items(writer: Any) -> bool:
    """Whether ``writer``'s ``prepare_local_plan``/``prepare_global_plan`` are torch's
    filesystem writer's, which never read ``SavePlan.items`` (2.4-2.15), or are marked
    ``_dcplan_ignores_items`` (dcplan's writer, whose overrides only call torch's)."""
    for name in ("prepare_local_plan", "prepare_global_plan"):
        fn = getattr(type(writer), name, None)
        if getattr(fn, "_dcplan_ignores_items", False):
            continue
        if fn is None or getattr(fn, "__module__", None) != _FS_MODULE:
            return False
        if not getattr(fn, "__qualname__", "").split(".")[0].lstrip("_").startswith("FileSystemWriter"):
            return False
    return True


def dcp_save_context(max_depth: int = 16) -> tuple[Any, bool] | None:
    """The process group and writer of the ``dcp.save`` calling this planner.

    Returns ``(group, compact_ok)`` where ``group`` is the ``_DistWrapper``'s
    group (``None``: the default group) and ``compact_ok`` whether the storage
    writer ignores plan items before the gather (torch's filesystem writers);
    ``None`` when no ``dcp.save`` is on the stack, it runs without
    collectives (``no_dist``), or this torch keeps its state elsewhere. Found
    by looking for ``_save_state_dict``'s ``distW`` and ``storage_writer`` in
    the calling frames (2.4-2.15 keep both as closure variables of its
    ``local_step``); anything unexpected answers ``None``.
    """
    import sys

    from torch.distributed.checkpoint.utils import _DistWrapper

    frame: Any
    try:
        frame = sys._getframe(1)
    except (AttributeError, ValueError):  # pragma: no cover
        return None
    for _ in range(max_depth):
        if frame is None:
            return None
        names = frame.f_code.co_freevars + frame.f_code.co_varnames
        if "distW" in names:
            loc = frame.f_locals
            dw, writer = loc.get("distW"), loc.get("storage_writer")
            if not isinstance(dw, _DistWrapper) or writer is None:
                return None
            if not getattr(dw, "use_dist", False):
                return None
            return getattr(dw, "group", None), _writer_ignores_items(writer)
        frame = frame.f_back
    return None


# ---------------------------------------------------------------- tensor records (dcplan.storage.record)
def dtype_by_name(name: str) -> torch.dtype | None:
    """``torch.<name>`` when it is a dtype (records of torch 2.x name dtypes as ``torch.<name>``)."""
    obj = getattr(torch, name, None) if name.isidentifier() and not name.startswith("_") else None
    return obj if isinstance(obj, torch.dtype) else None


def legacy_storage_dtype(name: str) -> torch.dtype | None:
    """The dtype of the legacy typed storage class ``torch.<name>`` (``FloatStorage``...), else ``None``."""
    if not name.endswith("Storage") or not name.isidentifier() or name.startswith("_"):
        return None
    cls = getattr(torch, name, None)
    legacy = getattr(torch.storage, "_LegacyStorage", None)
    if not isinstance(cls, type) or legacy is None or not issubclass(cls, legacy):
        return None
    try:
        # ``_dtype`` is the same class property without the TypedStorage deprecation warning that
        # ``dtype`` emits on every access (a load would print it once per record); ``dtype`` where absent
        dtype = cls._dtype if hasattr(cls, "_dtype") else cls.dtype  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - a storage class without a dtype
        return None
    return dtype if isinstance(dtype, torch.dtype) else None


def strides_are_contiguous(size: Sequence[int], stride: Sequence[int]) -> bool:
    """Whether ``stride`` is the row-major layout of ``size`` (dims of size 1 are free, as in torch)."""
    expected = 1
    for s, st in zip(reversed(size), reversed(stride)):
        if s != 1 and st != expected:
            return False
        expected *= s
    return True


def bump_version(t: torch.Tensor) -> None:
    """Mark ``t`` as modified in place (its autograd version counter), as ``copy_`` would."""
    fn = getattr(getattr(torch.autograd, "graph", None), "increment_version", None)
    if fn is not None:
        fn(t)
    elif t.numel() and t.dtype != torch.bool:  # pragma: no cover - older torch: an in-place no-op bumps it
        t.add_(0)
