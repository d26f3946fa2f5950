"""``dcplan.save`` / ``dcplan.load`` / ``dcplan.async_save``: the safe default in one call.

Each builds dcplan's planner and storage (:class:`dcplan.FileSystemWriter`: atomic commit,
fsync, checksums; :class:`dcplan.FileSystemReader`: safe ``.metadata``, confined paths,
checksums verified) and calls ``torch.distributed.checkpoint`` with dcp's own process-group
handling: ``process_group=`` selects the group, and a process with no initialized default
group saves or loads alone (``no_dist``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from typing import Any

import torch.distributed.checkpoint as dcp

from dcplan import compat
from dcplan.config import Config

__all__ = ["async_save", "load", "save"]


def _writer(path: Any, checksums: bool, sync_files: bool, writer_options: Mapping[str, Any] | None) -> Any:
    from dcplan.storage.writer import FileSystemWriter

    return FileSystemWriter(path, sync_files=sync_files, checksums=checksums, **dict(writer_options or {}))


def _save_args(
    path: str | os.PathLike[str], planner: Any, config: Config | Mapping[str, Any] | None,
    checksums: bool, sync_files: bool, writer_options: Mapping[str, Any] | None, overrides: dict[str, Any],
    process_group: Any = None,
) -> tuple[Any, Any]:
    from dcplan.save.planner import SavePlanner

    if planner is None:
        planner = SavePlanner(config, process_group=process_group, **overrides)
    elif config is not None or overrides:
        raise TypeError("pass config options or a planner, not both (the planner already holds its config)")
    return _writer(path, checksums, sync_files, writer_options), planner


def save(
    state_dict: dict[str, Any],
    path: str | os.PathLike[str],
    *,
    process_group: Any = None,
    planner: Any = None,
    config: Config | Mapping[str, Any] | None = None,
    checksums: bool = True,
    sync_files: bool = True,
    writer_options: Mapping[str, Any] | None = None,
    **overrides: Any,
) -> Any:
    """Save ``state_dict`` to the checkpoint directory ``path``, atomically.

    On every rank of ``process_group`` (or alone when torch.distributed is not initialized).
    An existing checkpoint at ``path`` stays loadable until the new one is complete.

    :param planner: a save planner to use instead of ``dcplan.SavePlanner(config, **overrides)``.
    :param config: a :class:`dcplan.Config` or mapping (else config sources are read).
    :param checksums: store a checksum per item (default ``True``).
    :param sync_files: fsync data and metadata before the commit (default ``True``).
    :param writer_options: more :class:`dcplan.FileSystemWriter` (torch ``FileSystemWriter``) options,
        e.g. ``{"thread_count": 4}``.
    :param overrides: config keys, e.g. ``strategy="split"``.
    :returns: the checkpoint's ``Metadata``.
    """
    writer, planner = _save_args(path, planner, config, checksums, sync_files, writer_options, overrides, process_group)
    kwargs = compat.dcp_call_kwargs(dcp.save, process_group)
    with _dcplan_errors():
        return dcp.save(state_dict, storage_writer=writer, planner=planner, **kwargs)


def async_save(
    state_dict: dict[str, Any],
    path: str | os.PathLike[str],
    *,
    process_group: Any = None,
    planner: Any = None,
    config: Config | Mapping[str, Any] | None = None,
    checksums: bool = True,
    sync_files: bool = True,
    writer_options: Mapping[str, Any] | None = None,
    **overrides: Any,
) -> Any:
    """Like :func:`save`, through ``dcp.async_save``: returns what it returns (a future to wait on)."""
    writer, planner = _save_args(path, planner, config, checksums, sync_files, writer_options, overrides, process_group)
    kwargs = compat.dcp_call_kwargs(dcp.async_save, process_group)
    return dcp.async_save(state_dict, storage_writer=writer, planner=planner, **kwargs)


def load(
    state_dict: dict[str, Any],
    path: str | os.PathLike[str],
    *,
    process_group: Any = None,
    planner: Any = None,
    config: Config | Mapping[str, Any] | None = None,
    verify_checksums: bool = True,
    **overrides: Any,
) -> None:
    """Load the checkpoint at ``path`` into ``state_dict`` in place, safely.

    :param planner: a load planner to use instead of ``dcplan.LoadPlanner(config, **overrides)``.
    :param config: a :class:`dcplan.Config` or mapping (also read by the reader: ``trust_checkpoint``,
        ``trusted_globals``).
    :param verify_checksums: check each item against the checkpoint's checksums (default ``True``).
    :param overrides: config keys, e.g. ``partial_load=True``.
    """
    from dcplan.load.planner import LoadPlanner
    from dcplan.storage.reader import FileSystemReader

    if planner is None:
        planner = LoadPlanner(config, **overrides)
    elif overrides:
        raise TypeError("pass config options or a planner, not both (the planner already holds its config)")
    reader = FileSystemReader(path, config=config, verify_checksums=verify_checksums,
                              **{k: v for k, v in overrides.items() if k in ("trust_checkpoint", "trusted_globals")})
    kwargs = compat.dcp_call_kwargs(dcp.load, process_group)
    with _dcplan_errors():
        dcp.load(state_dict, storage_reader=reader, planner=planner, **kwargs)


@contextlib.contextmanager
def _dcplan_errors() -> Iterator[None]:
    """Re-raise a dcplan error that torch wrapped in its ``CheckpointException`` as itself.

    The one-line message (which file, which item, what to do) is then what the user sees;
    ``__cause__`` keeps torch's exception with every rank's traceback.
    """
    try:
        yield
    except BaseException as exc:
        from dcplan.errors import DcplanError

        for _rank, failure in sorted(compat.checkpoint_failures(exc).items()):
            if isinstance(failure, DcplanError):
                raise failure from exc
        raise
