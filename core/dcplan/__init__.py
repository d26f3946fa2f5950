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

from dcplan import compat as _compat
from dcplan.config import Config, resolve_config
from dcplan.errors import (
    CheckpointReadError,
    ConfigError,
    DcplanError,
    MetadataVersionError,
    MissingKeysError,
    PlanMismatchError,
    PlanValidationError,
    PluginError,
    UnknownStrategyError,
    UnsafeCheckpointError,
)
from dcplan.load.planner import LoadPlanner
from dcplan.load.report import LoadReport
from dcplan.load.safe import FileSystemReader
from dcplan.manager import get_plugin_manager, hookimpl
from dcplan.save.planner import SavePlanner
from dcplan.types import PluginInfo, Strategy

if TYPE_CHECKING:  # pragma: no cover
    from torch.distributed.checkpoint.planner import SavePlan

__all__ = [
    "CheckpointReadError",
    "Config",
    "ConfigError",
    "FileSystemReader",
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
    "dedup",
    "get_plugin_manager",
    "hookimpl",
    "resolve_config",
]

# torch <= 2.14 then refuses a torch 2.15 .metadata with MetadataVersionError (see compat)
_compat.install_metadata_format_guard()

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
