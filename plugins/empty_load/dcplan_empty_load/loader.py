"""Load a DCP checkpoint into an empty dict.

The state dict, nested structure included, is rebuilt from the checkpoint's metadata;
only the selected tensors are allocated. Unlike torch's ``_EmptyStateDictLoadPlanner``
it works when the metadata has no ``planner_data`` or lacks a key in it (checkpoints
written by other tools), and it restores non-tensor items safely (weights-only unpickler,
see :mod:`dcplan.load.safe`)::

    from dcplan_empty_load import load_checkpoint

    sd = load_checkpoint("ckpt/")                  # everything
    model = load_checkpoint("ckpt/", keys=["model"])  # everything under "model"

:func:`load_checkpoint` reads in this process only: no process group is needed, and on
one rank of many it does not involve the other ranks. :class:`EmptyLoadPlanner` can also
be handed to ``dcp.load``; the rebuilt dict is then :attr:`EmptyLoadPlanner.result`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

import dcplan
from dcplan import compat
from dcplan.errors import DcplanError
from dcplan.storage.reader import FileSystemReader

__all__ = ["EmptyLoadPlanner", "KeySelectionError", "load_checkpoint", "select_keys"]


class KeySelectionError(DcplanError, KeyError):
    """A requested key or prefix matches nothing in the checkpoint."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


def _path_of(metadata: Any, fqn: str) -> tuple[Any, ...]:
    """The nested path recorded for ``fqn``; ``(fqn,)`` when ``planner_data`` is absent or lacks it."""
    pd = getattr(metadata, "planner_data", None)
    path = pd.get(fqn) if isinstance(pd, Mapping) else None
    if isinstance(path, (tuple, list)) and path and all(isinstance(p, (str, int)) for p in path):
        return tuple(path)
    return (fqn,)


def _dotted(path: Sequence[Any]) -> str:
    return ".".join(str(p) for p in path)


def select_keys(metadata: Any, keys: Iterable[str] | None) -> list[str]:
    """The checkpoint's flattened keys selected by ``keys`` (sorted).

    :param keys: ``None`` for everything, or flattened keys (``model.layer.weight``) and
        nested prefixes (``model`` selects everything under it; ``optim.state``).
    :raises KeySelectionError: a key matches nothing; the message lists what exists.
    """
    all_keys = sorted(metadata.state_dict_metadata)
    if keys is None:
        return all_keys
    if isinstance(keys, str):
        keys = [keys]
    wanted = sorted(set(keys))
    dotted = {fqn: _dotted(_path_of(metadata, fqn)) for fqn in all_keys}
    selected: set[str] = set()
    unmatched = []
    for want in wanted:
        prefix = want + "."
        hit = [
            fqn
            for fqn in all_keys
            if fqn == want or fqn.startswith(prefix) or dotted[fqn] == want or dotted[fqn].startswith(prefix)
        ]
        if not hit:
            unmatched.append(want)
        selected.update(hit)
    if unmatched:
        tops = sorted({_path_of(metadata, k)[0] for k in all_keys}, key=str)
        shown = ", ".join(map(str, tops[:20])) + (" ..." if len(tops) > 20 else "")
        raise KeySelectionError(
            f"key(s) {', '.join(map(repr, unmatched))} match nothing in the checkpoint; give flattened keys "
            f"or nested prefixes (top-level names: {shown}; `dcplan inspect CKPT` lists every key)"
        )
    return sorted(selected)


def _placeholder(entry: Any) -> Any:
    if isinstance(entry, compat.TensorStorageMetadata):
        return torch.empty(tuple(entry.size), dtype=entry.properties.dtype)
    return entry  # a BytesStorageMetadata: replaced by the saved object when it is read


class EmptyLoadPlanner(dcplan.LoadPlanner):
    """A :class:`dcplan.LoadPlanner` that loads into an empty dict rebuilt from the metadata.

    :param keys: ``None`` for everything, or flattened keys / nested prefixes to select.
    :param config: a :class:`dcplan.Config` or mapping (e.g. ``trusted_globals``).
    :param overrides: config keys.
    """

    def __init__(self, keys: Iterable[str] | None = None, config: Any = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        self.keys: list[str] | None = None if keys is None else ([keys] if isinstance(keys, str) else list(keys))

    def set_up_planner(self, state_dict: dict[str, Any], metadata: Any = None, is_coordinator: bool = False) -> None:
        if metadata is None:
            raise ValueError("EmptyLoadPlanner needs the checkpoint metadata (torch passes it to set_up_planner)")
        if state_dict:
            raise ValueError(
                "EmptyLoadPlanner fills an empty dict and got one with keys "
                f"{sorted(map(str, state_dict))[:5]}; pass {{}} (use dcplan.LoadPlanner to load into existing tensors)"
            )
        flat: dict[str, Any] = {}
        mappings: dict[str, tuple[Any, ...]] = {}
        for fqn in select_keys(metadata, self.keys):
            value = _placeholder(metadata.state_dict_metadata[fqn])
            path = _path_of(metadata, fqn)
            try:
                compat.set_element(state_dict, path, value)
            except (TypeError, KeyError, IndexError, AttributeError):
                # the recorded path collides with another key's structure: keep the flat key
                path = (fqn,)
                state_dict[fqn] = value
            flat[fqn] = value
            mappings[fqn] = path
        self.original_state_dict = state_dict
        self.state_dict = flat
        self.mappings = mappings
        self.flatten_state_dict = True
        self.metadata = metadata
        self.is_coordinator = is_coordinator

    @property
    def result(self) -> dict[str, Any]:
        """The rebuilt (nested) state dict, filled once the load has run."""
        return self.original_state_dict


def load_checkpoint(
    path: str | os.PathLike[str] | None = None,
    keys: Iterable[str] | None = None,
    *,
    storage_reader: Any = None,
    trust: bool = False,
    config: Any = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Load a DCP checkpoint (or the selected ``keys``) into a new dict, in this process only.

    :param path: the checkpoint directory (or give ``storage_reader``).
    :param keys: ``None`` for everything, or flattened keys / nested prefixes.
    :param storage_reader: a storage reader to use instead of :class:`dcplan.FileSystemReader`.
    :param trust: unpickle non-tensor items and ``.metadata`` with full pickle (DANGEROUS).
    :param config: a :class:`dcplan.Config` or mapping; ``overrides`` are config keys.
    :returns: the nested state dict; tensors on CPU, non-tensor items as saved.
    """
    if trust:
        overrides["trust_checkpoint"] = True
    if storage_reader is None:
        if path is None:
            raise ValueError("load_checkpoint needs a path or a storage_reader")
        storage_reader = FileSystemReader(path, config=config, **overrides)
    planner = EmptyLoadPlanner(keys, config, **overrides)
    metadata = storage_reader.read_metadata()
    # dcp.load's own steps, without collectives (dcp.load(no_dist=True) exists only from torch 2.7)
    state_dict: dict[str, Any] = {}
    planner.set_up_planner(state_dict, metadata, True)
    storage_reader.set_up_storage_reader(metadata, True)
    local = storage_reader.prepare_local_plan(planner.create_local_plan())
    global_plan = storage_reader.prepare_global_plan(planner.create_global_plan([local]))
    final = planner.finish_plan(global_plan[0])
    fut = storage_reader.read_data(final, planner)
    if fut is not None:
        fut.wait()
    return planner.result
