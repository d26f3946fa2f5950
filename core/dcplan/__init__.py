"""dcplan: pluggable save and load planning for torch.distributed.checkpoint.

One call each (dcplan's planners, atomic checksummed writer, safe reader)::

    import dcplan

    dcplan.save(state_dict, path)
    dcplan.load(state_dict, path)

or as torch's planners and storage::

    import torch.distributed.checkpoint as dcp

    dcp.save(state_dict, storage_writer=dcplan.FileSystemWriter(path), planner=dcplan.SavePlanner())
    dcp.load(state_dict, storage_reader=dcplan.FileSystemReader(path), planner=dcplan.LoadPlanner())
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

# ``dcplan.save`` / ``dcplan.load`` are the packages dcplan.save / dcplan.load, made callable:
# dcplan.save(state_dict, path) is dcplan.api.save, dcplan.load(state_dict, path) is dcplan.api.load
import dcplan.load as load  # noqa: E402,I001
import dcplan.save as save  # noqa: E402,I001
from dcplan.api import async_save
from dcplan.config import Config, resolve_config
from dcplan.errors import (
    ConfigError,
    DcplanError,
    MissingKeysError,
    PlanMismatchError,
    PlanValidationError,
    PluginError,
    UnknownStrategyError,
)
from dcplan.load.planner import LoadPlanner
from dcplan.load.report import LoadReport
from dcplan.load.safe import (
    CheckpointPathError,
    CheckpointReadError,
    CorruptCheckpointError,
    MetadataVersionError,
    UnsafeCheckpointError,
)
from dcplan.manager import get_plugin_manager, hookimpl
from dcplan.save.planner import SavePlanner
from dcplan.storage.reader import FileSystemReader
from dcplan.storage.writer import FileSystemWriter
from dcplan.types import PluginInfo, Strategy

if TYPE_CHECKING:  # pragma: no cover
    from torch.distributed.checkpoint.planner import SavePlan

__all__ = [
    "CheckpointPathError",
    "CheckpointReadError",
    "Config",
    "CorruptCheckpointError",
    "ConfigError",
    "FileSystemReader",
    "FileSystemWriter",
    "LoadReport",
    "MetadataVersionError",
    "UnsafeCheckpointError",
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
    "async_save",
    "dedup",
    "get_plugin_manager",
    "hookimpl",
    "load",
    "resolve_config",
    "save",
]

try:
    from importlib.metadata import version as _v

    __version__ = _v("dcplan")
except Exception:  # pragma: no cover - running from a source tree
    __version__ = "0+unknown"


def dedup(all_plans: Sequence[SavePlan], strategy: str = "size_balanced", **options: Any) -> list[SavePlan]:
    """Run a registered dedup strategy on local plans, without processes.

    :param all_plans: one local ``SavePlan`` per rank, in rank order. Not mutated.
    :param strategy: a registered strategy name (``dcplan plugins`` lists them).
    :param options: the strategy's options (unknown names are an error).
    :returns: new plans, one per rank, each item written by one of its holders.
    """
    strat = get_plugin_manager().get_strategy(strategy)
    return list(strat.func(list(all_plans), **strat.resolve_options(options)))
