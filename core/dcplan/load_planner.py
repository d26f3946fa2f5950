"""``dcplan.LoadPlanner``: a drop-in for torch's ``DefaultLoadPlanner``."""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import torch

from dcplan import compat
from dcplan.compat import LoadPlan, Metadata, ReadItem
from dcplan.config import Config, resolve_config
from dcplan.errors import MissingKeysError
from dcplan.manager import DcplanPluginManager, get_plugin_manager

__all__ = ["LoadPlanner"]


class LoadPlanner(compat.DefaultLoadPlanner):  # type: ignore[misc]
    """Drop-in ``LoadPlanner`` whose steps run through dcplan's hooks.

    Strict by default: every key of the state dict must be in the checkpoint,
    and all missing keys are reported at once during planning, on every rank,
    before any tensor is read. ``dcplan-partial-load`` relaxes that by config.

    :param config: a :class:`dcplan.Config`, or ``None`` to read config sources.
    :param overrides: any :class:`Config` key, e.g. ``partial_load=True``.
    """

    def __init__(
        self,
        config: Config | Mapping[str, Any] | None = None,
        *,
        flatten_state_dict: bool = True,
        flatten_sharded_tensors: bool = True,
        plugin_manager: DcplanPluginManager | None = None,
        **overrides: Any,
    ) -> None:
        compat.DefaultLoadPlanner.__init__(
            self, flatten_state_dict=flatten_state_dict, flatten_sharded_tensors=flatten_sharded_tensors
        )
        self.config, self.config_sources = resolve_config(config, overrides)
        self._pm = plugin_manager
        self.skip_keys: set[str] = set()
        self.missing_keys: list[str] = []
        self.report: Any = None
        self.original_state_dict: dict[str, Any] = {}
        self.mappings: dict[str, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_pm"] = None
        return state

    @property
    def plugin_manager(self) -> DcplanPluginManager:
        if self._pm is None:
            self._pm = get_plugin_manager()
        return self._pm

    @property
    def hook(self) -> Any:
        return self.plugin_manager.hook

    def set_up_planner(
        self, state_dict: dict[str, Any], metadata: Metadata | None = None, is_coordinator: bool = False
    ) -> None:
        if metadata is None:
            raise ValueError("dcplan.LoadPlanner needs the checkpoint metadata (torch passes it to set_up_planner)")
        new_sd = self.hook.dcplan_set_up_load_state_dict(
            planner=self, state_dict=state_dict, metadata=metadata, is_coordinator=is_coordinator
        )
        if new_sd is not None:
            state_dict = new_sd
        compat.init_state_dict(state_dict)
        self.original_state_dict = state_dict
        if self.flatten_sharded_tensors:
            state_dict = compat.flatten_sharded_tensors(state_dict)
        if self.flatten_state_dict:
            state_dict, self.mappings = compat.flatten_state_dict(state_dict)
        self.state_dict = state_dict
        self.metadata = metadata
        self.is_coordinator = is_coordinator

    def nested_key(self, fqn: str) -> str:
        """The user's nested spelling of a flattened key, e.g. ``state[0]['exp_avg']``."""
        path = self.mappings.get(fqn)
        if not path:
            return fqn
        head, *rest = path
        return str(head) + "".join(f"[{p!r}]" for p in rest)

    def _maybe_old_format(self) -> None:
        """Checkpoints from torch <= 2.3 flattened lists differently."""
        if not self.flatten_state_dict:
            return
        keys = set(self.metadata.state_dict_metadata)
        missing = set(self.state_dict) - keys
        if not missing:
            return
        old = compat.old_format_flatten(self.original_state_dict)
        if old is None:
            return
        old_sd, old_map = old
        if set(old_sd) - keys < missing:
            self.state_dict, self.mappings = old_sd, old_map

    def create_local_plan(self) -> LoadPlan:
        assert self.metadata is not None
        self._maybe_old_format()
        md_keys = self.metadata.state_dict_metadata
        self.missing_keys = sorted(k for k in self.state_dict if k not in md_keys)
        self.skip_keys = set()
        if self.missing_keys:
            policy = self.hook.dcplan_missing_keys_policy(
                planner=self, missing=self.missing_keys, config=self.config
            )
            if policy == "skip":
                self.skip_keys = set(self.missing_keys)
            else:
                raise MissingKeysError(self.missing_keys, [self.nested_key(k) for k in self.missing_keys])
        plan = self.hook.dcplan_create_local_load_plan(
            planner=self, state_dict=self.state_dict, metadata=self.metadata
        )
        self.plan = plan
        return plan

    def create_global_plan(self, global_plan: list[LoadPlan]) -> list[LoadPlan]:
        return self.hook.dcplan_create_global_load_plan(planner=self, all_plans=global_plan)

    def finish_plan(self, new_plan: LoadPlan) -> LoadPlan:
        return new_plan

    # -- data ------------------------------------------------------------
    def unpickle(self, fqn: str, value: io.BytesIO) -> Any:
        """Restore a non-tensor item. Overridden by the safe-loading support."""
        from dcplan.safe import load_object

        return load_object(self, fqn, value)

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        obj = self.unpickle(fqn, value)
        if self.flatten_state_dict:
            compat.set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        tensor = compat.find_state_dict_object(self.state_dict, read_item.dest_index)
        return compat.narrow_tensor_by_index(tensor, read_item.dest_offsets, read_item.lengths)
