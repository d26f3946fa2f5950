"""Safe loading: a checkpoint from elsewhere must never run code on the loading machine.

torch's ``DefaultLoadPlanner.load_bytes`` unpickles every non-tensor item with
``torch.load(..., weights_only=False)`` and ``FileSystemReader.read_metadata`` reads
``.metadata`` with a bare ``pickle.load``: a crafted checkpoint runs code on ``dcp.load``.
dcplan closes both doors by default:

* non-tensor items go through torch's weights-only unpickler (:func:`load_object`,
  used by :class:`dcplan.LoadPlanner` and the empty loader);
* ``.metadata`` goes through an allow-list unpickler that admits only DCP's metadata
  types and plain containers (:func:`read_metadata_file`, used by
  :class:`dcplan.storage.reader.FileSystemReader` and every dcplan CLI command).

Both admit more through config (``trusted_globals = ["package.module.Class"]``), through
plugins (the ``dcplan_safe_globals`` hook), or not at all with ``trust_checkpoint = true``
(DANGEROUS: a crafted checkpoint can then run code). See ``docs/safe-loading.md``.
"""

from __future__ import annotations

import dataclasses
import enum
import pickle
import re
from collections.abc import Iterable, Mapping
from typing import IO, Any

import torch

from dcplan import compat
from dcplan.config import Config
from dcplan.errors import (  # defined in errors.py, re-exported here where they were public
    CheckpointPathError,
    CheckpointReadError,
    ConfigError,
    CorruptCheckpointError,
    MetadataVersionError,
    UnsafeCheckpointError,
)

__all__ = [
    "CheckpointPathError",
    "CheckpointReadError",
    "CorruptCheckpointError",
    "MetadataVersionError",
    "UnsafeCheckpointError",
    "check_trusted_globals",
    "collect_safe_globals",
    "default_safe_globals",
    "load_object",
    "metadata_allow_list",
    "read_metadata_file",
]

# ---------------------------------------------------------------- globals
_NUMPY_GLOBALS = (
    # numpy >= 2 spells the core module ``numpy._core``, numpy 1.x ``numpy.core``.
    ("numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct"),
    ("numpy._core.multiarray.scalar", "numpy.core.multiarray.scalar"),
    ("numpy.ndarray",),
    ("numpy.dtype",),
    # protocol-2 pickles of numpy bytes go through _codecs.encode (a pure data transform);
    # torch >= 2.6 admits it by default, older torch needs it for np.random.get_state()
    ("_codecs.encode",),
)
#: Plain data types torch 2.4 blocks (2.6+ admits the builtins) and paths, which configs hold.
_PLAIN_GLOBALS = (
    "builtins.set",
    "builtins.frozenset",
    "builtins.complex",
    "builtins.bytearray",
    "pathlib.PosixPath",
    "pathlib.PurePosixPath",
    "pathlib.PureWindowsPath",
)


def default_safe_globals() -> list[Any]:
    """What dcplan admits for non-tensor items on top of torch's weights-only defaults.

    Sets, frozensets, complex numbers, bytearrays and ``pathlib`` paths (pure data;
    torch 2.4 blocks the builtins, every torch blocks paths). NumPy arrays, scalars and dtypes (so ``np.random.get_state()`` and metrics round-trip),
    when NumPy is installed. Object arrays stay safe: their elements go through the same
    restricted unpickler.
    """
    out: list[Any] = [(compat.import_object(name), name) for name in _PLAIN_GLOBALS]
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a dependency
        return out
    for spellings in _NUMPY_GLOBALS:
        for name in spellings:
            try:
                obj = compat.import_object(name)
            except (ImportError, AttributeError):
                continue
            out.append((obj, name))
            break
    dtypes_mod = getattr(np, "dtypes", None)  # numpy >= 1.25: one class per dtype
    if dtypes_mod is not None:
        for name in sorted(dir(dtypes_mod)):
            cls = getattr(dtypes_mod, name)
            if isinstance(cls, type) and name.endswith("DType") and issubclass(cls, np.dtype):
                out.append((cls, f"numpy.dtypes.{name}"))
    return out


def _resolve(entry: Any, source: str) -> tuple[Any, str]:
    """``(object, "module.name")`` from a class/function, a string or an ``(obj, name)`` pair."""
    if isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[1], str):
        return entry[0], entry[1]
    if isinstance(entry, str):
        try:
            return compat.import_object(entry), entry
        except (ImportError, AttributeError) as exc:
            raise ConfigError(
                f"trusted global {entry!r} from {source} cannot be imported ({exc}); "
                "spell it as 'package.module.Qualname' and install its package"
            ) from None
    name = f"{getattr(entry, '__module__', '?')}.{getattr(entry, '__qualname__', getattr(entry, '__name__', '?'))}"
    return entry, name


def check_trusted_globals(config: Config) -> None:
    """Import every ``trusted_globals`` name now, so a typo fails when a planner or reader is built.

    :raises ConfigError: naming the name that cannot be imported.
    """
    for name in config.trusted_globals:
        _resolve(name, "trusted_globals")


def collect_safe_globals(config: Config | None = None, plugin_manager: Any = None) -> list[tuple[Any, str]]:
    """dcplan's defaults, the plugins' ``dcplan_safe_globals`` and config's ``trusted_globals``.

    :returns: ``(object, "module.name")`` pairs, de-duplicated, in a stable order.
    """
    entries: list[tuple[Any, str]] = [(o, n) for o, n in default_safe_globals()]
    if plugin_manager is not None:
        for result in plugin_manager.hook.dcplan_safe_globals():
            for entry in result or ():
                entries.append(_resolve(entry, "a dcplan_safe_globals hook"))
    if config is not None:
        for name in config.trusted_globals:
            entries.append(_resolve(name, "trusted_globals"))
    seen: set[str] = set()
    out: list[tuple[Any, str]] = []
    for obj, name in entries:
        if name not in seen:
            seen.add(name)
            out.append((obj, name))
    return out


def _weights_only_globals(pairs: Iterable[tuple[Any, str]]) -> list[Any]:
    """torch's safe-globals entries: ``(obj, name)`` where the name differs from the object's own."""
    out: list[Any] = []
    for obj, name in pairs:
        own = f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', getattr(obj, '__name__', ''))}"
        out.append(obj if own == name else (obj, name))
    return out


# ---------------------------------------------------------------- non-tensor items
_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")


def _blocked_from(value: IO[bytes], exc: BaseException, allowed: set[str]) -> list[str]:
    try:
        value.seek(0)
        found = compat.unsafe_globals_in(value)
    except Exception:  # noqa: BLE001 - best effort: fall back to torch's message
        found = None
    if found:
        blocked = sorted(set(found) - allowed)
        if blocked:
            return blocked
    return sorted(set(_GLOBAL_RE.findall(str(exc))))


def load_object(planner: Any, fqn: str, value: IO[bytes]) -> Any:
    """Unpickle one non-tensor item: torch's weights-only unpickler unless the checkpoint is trusted.

    :param planner: the load planner (its ``config`` and ``plugin_manager`` say what is admitted).
    :param fqn: the flattened key, for the error message.
    :param value: the item's bytes, as written by ``torch.save``.
    :raises UnsafeCheckpointError: naming the key, the blocked global and how to allow it.
    """
    config = getattr(planner, "config", None)
    if config is not None and config.trust_checkpoint:
        return torch.load(value, weights_only=False)
    pairs = getattr(planner, "_dcplan_safe_globals", None)
    if pairs is None:
        pairs = collect_safe_globals(config, getattr(planner, "plugin_manager", None))
        try:
            planner._dcplan_safe_globals = pairs
        except AttributeError:  # pragma: no cover - a planner with __slots__
            pass
    try:
        return compat.weights_only_load(value, _weights_only_globals(pairs))
    except pickle.UnpicklingError as exc:
        nested = fqn
        nested_key = getattr(planner, "nested_key", None)
        if callable(nested_key):
            nested = nested_key(fqn)
        key = fqn if nested == fqn else f"{fqn} ({nested})"
        blocked = _blocked_from(value, exc, {n for _, n in pairs})
        raise UnsafeCheckpointError(key, blocked) from None


# ---------------------------------------------------------------- .metadata
_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
_BASE_ALLOWED = (
    "torch.Size",
    "torch.serialization._get_layout",  # layouts pickle as _get_layout("torch.strided"), a table lookup
    "torch.distributed.checkpoint.filesystem._StorageInfo",
    "collections.OrderedDict",
    "builtins.set",
    "builtins.frozenset",
    "builtins.slice",
    "builtins.complex",
    "builtins.object",
    "copyreg._reconstructor",
    "pathlib.Path",
    "pathlib.PosixPath",
    "pathlib.PurePosixPath",
    "pathlib.WindowsPath",
    "pathlib.PureWindowsPath",
)


def metadata_allow_list() -> dict[str, Any]:
    """The globals the ``.metadata`` reader admits by default: ``{"module.name": object}``.

    Every class of ``torch.distributed.checkpoint.metadata`` (``Metadata``, ``TensorProperties``,
    ``MetadataIndex``, ``StorageMeta``...), the file system's ``_StorageInfo``, ``torch.Size``,
    plain containers and paths. torch dtypes, layouts and memory formats are admitted separately.
    """
    from torch.distributed.checkpoint import metadata as md_mod

    out: dict[str, Any] = {}
    for name, obj in sorted(vars(md_mod).items()):
        if isinstance(obj, type) and obj.__module__ == _METADATA_MODULE and (
            dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum)
        ):
            out[f"{_METADATA_MODULE}.{name}"] = obj
    for name in _BASE_ALLOWED:
        try:
            out[name] = compat.import_object(name)
        except (ImportError, AttributeError):  # pragma: no cover - a torch without it
            continue
    return out


_TORCH_SCALAR_TYPES = (torch.dtype, torch.layout, torch.memory_format)


class _MetadataUnpickler(pickle.Unpickler):
    """Admits only allow-listed globals; everything else raises before it is called."""

    def __init__(self, file: IO[bytes], allowed: Mapping[str, Any]) -> None:
        super().__init__(file)
        self._allowed = allowed

    def find_class(self, module: str, name: str) -> Any:
        full = f"{module}.{name}"
        if full in self._allowed:
            return self._allowed[full]
        if module == "torch" and isinstance(getattr(torch, name, None), _TORCH_SCALAR_TYPES):
            return getattr(torch, name)
        raise UnsafeCheckpointError(".metadata", [full])

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeCheckpointError(".metadata", [], "it uses persistent ids, which DCP metadata never does")


def _unpack_error(exc: BaseException) -> bool:
    return isinstance(exc, (ValueError, TypeError)) and "unpack" in str(exc)


def read_metadata_file(
    stream: IO[bytes],
    *,
    where: str = ".metadata",
    extra_globals: Iterable[tuple[Any, str]] = (),
    trust: bool = False,
) -> compat.Metadata:
    """Unpickle a DCP ``.metadata`` stream with the allow-list unpickler.

    :param stream: the open file.
    :param where: the path, for messages.
    :param extra_globals: more ``(object, "module.name")`` pairs to admit.
    :param trust: use the full pickle module (DANGEROUS).
    :raises UnsafeCheckpointError: the file needs a global that is not admitted.
    :raises MetadataVersionError: the file was written by a newer torch (e.g. 2.15 strides).
    :raises CheckpointReadError: the file is truncated, corrupted or not DCP metadata.
    """
    allowed = metadata_allow_list()
    for obj, name in extra_globals:
        allowed[name] = obj
    try:
        if trust:
            metadata = pickle.load(stream)
        else:
            metadata = _MetadataUnpickler(stream, allowed).load()
    except (UnsafeCheckpointError, MetadataVersionError):  # the latter: compat.install_metadata_format_guard
        raise
    except (EOFError, pickle.UnpicklingError) as exc:
        raise CheckpointReadError(
            f"{where} is truncated or corrupted ({type(exc).__name__}: {exc or 'no data'}); "
            "the checkpoint was not fully written or was damaged, re-save it"
        ) from None
    except Exception as exc:  # noqa: BLE001 - any failure while rebuilding objects
        if _unpack_error(exc) and not compat.HAS_STRIDES:
            raise MetadataVersionError(
                f"{where} was written by a newer torch (>= 2.15, whose TensorProperties carry strides) "
                f"and torch {torch.__version__} cannot read it ({exc}); load it with torch >= 2.15, "
                "or re-save it with this torch"
            ) from None
        raise CheckpointReadError(
            f"{where} is corrupted or not DCP metadata ({type(exc).__name__}: {exc})"
        ) from None
    if not isinstance(metadata, compat.Metadata):
        raise CheckpointReadError(
            f"{where} does not hold DCP metadata (found {type(metadata).__name__}); "
            "is this a torch.distributed.checkpoint directory?"
        )
    return metadata
