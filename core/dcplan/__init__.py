"""dcplan: pluggable save and load planning for torch.distributed.checkpoint.

Use it as torch's planners::

    import torch.distributed.checkpoint as dcp
    import dcplan

    dcp.save(state_dict, checkpoint_id=path, planner=dcplan.SavePlanner())
    dcp.load(state_dict, checkpoint_id=path, planner=dcplan.LoadPlanner())
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from dcplan.config import Config, resolve_config
from dcplan.errors import (
    CheckpointPathError,
    CheckpointReadError,
    ConfigError,
    CorruptCheckpointError,
    DcplanError,
    MetadataVersionError,
    MissingKeysError,
    PlanMismatchError,
    PlanValidationError,
    PluginError,
    RankPlanningError,
    StrategyError,
    UnknownStrategyError,
    UnsafeCheckpointError,
)
from dcplan.manager import get_plugin_manager, hookimpl
from dcplan.types import LoadStrategy, PluginInfo, Strategy

if TYPE_CHECKING:  # pragma: no cover
    from torch.distributed.checkpoint.planner import SavePlan

    from dcplan.api import async_save
    from dcplan.load.planner import LoadPlanner
    from dcplan.load.report import LoadReport
    from dcplan.save.planner import SavePlanner
    from dcplan.storage.reader import FileSystemReader
    from dcplan.storage.writer import FileSystemWriter

# The names below import torch; they are loaded on first use (PEP 562), so that
# ``import dcplan`` and the ``dcplan`` command line (``dcplan --help``) stay fast.
_LAZY = {
    "LoadPlanner": "dcplan.load.planner",
    "LoadReport": "dcplan.load.report",
    "FileSystemReader": "dcplan.storage.reader",
    "FileSystemWriter": "dcplan.storage.writer",
    "async_save": "dcplan.api",
    "SavePlanner": "dcplan.save.planner",
}
# ``dcplan.save`` and ``dcplan.load`` are packages that are also callable: dcplan.save(state_dict, path)
_SUBMODULES = frozenset({"api", "builtin", "compat", "fmt", "gcpause", "hookspecs", "load", "save", "storage", "testing", "workloads"})


def __getattr__(name: str) -> Any:
    import importlib

    if name in _LAZY or name in _SUBMODULES:
        # torch is loaded from here on: torch <= 2.14 then refuses a torch 2.15 .metadata with
        # MetadataVersionError instead of failing deep in unpickling (see compat); idempotent
        importlib.import_module("dcplan.compat").install_metadata_format_guard()
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"dcplan.{name}")
    raise AttributeError(f"module 'dcplan' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))

__all__ = [
    "CheckpointPathError",
    "CorruptCheckpointError",
    "FileSystemWriter",
    "async_save",
    "load",
    "save",
    "CheckpointReadError",
    "Config",
    "ConfigError",
    "FileSystemReader",
    "LoadReport",
    "LoadStrategy",
    "MetadataVersionError",
    "UnsafeCheckpointError",
    "RankPlanningError",
    "StrategyError",
    "DcplanError",
    "LoadPlanner",
    "MissingKeysError",
    "PlanMismatchError",
    "PlanValidationError",
    "PluginError",
    "PluginInfo",
    "SavePlanner",
    "Strategy",
    "UnknownStrategyError",
    "dedup",
    "get_plugin_manager",
    "hookimpl",
    "resolve_config",
]

try:
    from importlib.metadata import version as _v

    __version__ = _v("dcplan")
except Exception:  # pragma: no cover - running from a source tree
    __version__ = "0+unknown"


def dedup(all_plans: Sequence[SavePlan], strategy: str | None = None, **options: Any) -> list[SavePlan]:
    """Run a registered dedup strategy on local plans, without processes.

    :param all_plans: one local ``SavePlan`` per rank, in rank order. Not mutated.
    :param strategy: a registered strategy name (``dcplan plugins`` lists them); default
        ``size_balanced``, or the built-in ``torch`` strategy when ``dcplan-size-balanced``
        is not installed.
    :param options: the strategy's options (unknown names are an error).
    :returns: new plans, one per rank, each item written by one of its holders.
    """
    from dcplan.manager import DEFAULT_STRATEGY

    strat = get_plugin_manager().resolve_strategy(strategy or DEFAULT_STRATEGY, explicit=strategy is not None)
    return list(strat.func(list(all_plans), **strat.resolve_options(options)))
