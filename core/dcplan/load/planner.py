"""``dcplan.LoadPlanner``: a drop-in for torch's ``DefaultLoadPlanner``.

Strict and safe by default:

* every key of the state dict must be in the checkpoint; *all* missing keys are
  reported at once (:class:`dcplan.MissingKeysError`) during planning, on every rank,
  before any tensor is read. ``dcplan-partial-load`` relaxes that by config
  (``partial_load = true``) and lets listed keys skip a shape mismatch
  (``skip_mismatch_keys``);
* non-tensor items are restored with torch's weights-only unpickler
  (:mod:`dcplan.load.safe`).

After planning, :attr:`LoadPlanner.report` holds a :class:`LoadReport` (missing,
unexpected and mismatched keys). The coordinator merges every rank's report and logs
it once (logger ``dcplan``).
"""

from __future__ import annotations

import dataclasses
import io
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from dcplan import compat
from dcplan.compat import LoadPlan, Metadata, ReadItem
from dcplan.config import Config, resolve_config
from dcplan.errors import ConfigError, MissingKeysError
from dcplan.failures import carry, raise_carried
from dcplan.fmt import format_path
from dcplan.load.report import LoadReport, Mismatch, _pairs, find_mismatches
from dcplan.load.strategy import LOAD_INFO_KEY
from dcplan.manager import DcplanPluginManager, HookedPlannerMixin

log = logging.getLogger("dcplan")

REPORT_KEY = "dcplan_load_report"
FAILURE_KEY = "dcplan_failure"



def _user_path(root: Any, path: Sequence[Any]) -> list[Any]:
    """``path`` with mapping keys restored to the user's objects (flattening turns ``0`` into ``'0'``)."""
    out: list[Any] = []
    node = root
    for part in path:
        key = part
        if isinstance(node, Mapping) and part not in node:
            key = next((k for k in node if str(k) == str(part)), part)
        out.append(key)
        try:
            node = node[key]
        except (KeyError, IndexError, TypeError):
            node = None
    return out


def _strip_report(plan: LoadPlan) -> LoadPlan:
    pd = plan.planner_data
    if not isinstance(pd, dict) or REPORT_KEY not in pd:
        return plan
    rest = {k: v for k, v in pd.items() if k != REPORT_KEY}
    return dataclasses.replace(plan, planner_data=rest or None)


class LoadPlanner(HookedPlannerMixin, compat.DefaultLoadPlanner):  # type: ignore[misc]
    """Drop-in ``LoadPlanner`` whose steps run through dcplan's hooks.

    The protocol, as ``dcp.load`` drives it (step -> hook -> module):

    0. ``LoadPlanner()`` (every rank): config and the partial-load plugin check;
       inside a process group an error is carried to step 4 (:mod:`dcplan.failures`).
    1. read the metadata (every rank) -> the storage reader (:mod:`dcplan.load.safe`).
    2. :meth:`set_up_planner` (every rank): the state dict to fill ->
       ``dcplan_set_up_load_state_dict``; then torch's flattening (:mod:`dcplan.compat`).
    3. :meth:`create_local_plan` (every rank): missing keys ->
       ``dcplan_missing_keys_policy``; shape/dtype mismatches ->
       :func:`dcplan.load.report.find_mismatches`; read items ->
       ``dcplan_create_local_load_plan`` (built-in: :mod:`dcplan.builtin`).
    4. gather; :meth:`create_global_plan` (coordinator): carried failures; the merged
       :class:`~dcplan.load.report.LoadReport`; -> ``dcplan_create_global_load_plan``.
    5. scatter; :meth:`finish_plan` (every rank).
    6. read (every rank): tensors in place (:meth:`resolve_tensor`), objects through
       :meth:`load_bytes` -> :func:`dcplan.load.safe.load_object`.

    Strict by default: every key of the state dict must be in the checkpoint,
    and all missing keys are reported at once during planning, on every rank,
    before any tensor is read. ``dcplan-partial-load`` relaxes that by config.
    Non-tensor items are restored with torch's weights-only unpickler unless
    ``trust_checkpoint`` is set (see :mod:`dcplan.load.safe`).

    :param config: a :class:`dcplan.Config`, or ``None`` to read config sources.
    :param allow_partial_load: torch's spelling of ``partial_load=True`` (accepted for drop-in use).
    :param overrides: any :class:`Config` key, e.g. ``partial_load=True``.
    :raises ConfigError: ``partial_load`` or ``skip_mismatch_keys`` is set but no installed,
        enabled plugin implements it (install ``dcplan-partial-load``).
    """

    def __init__(
        self,
        config: Config | Mapping[str, Any] | None = None,
        *,
        flatten_state_dict: bool = True,
        flatten_sharded_tensors: bool = True,
        allow_partial_load: bool | None = None,
        plugin_manager: DcplanPluginManager | None = None,
        **overrides: Any,
    ) -> None:
        compat.DefaultLoadPlanner.__init__(
            self, flatten_state_dict=flatten_state_dict, flatten_sharded_tensors=flatten_sharded_tensors
        )
        if allow_partial_load is not None:
            overrides.setdefault("partial_load", bool(allow_partial_load))
        self._pm = plugin_manager
        #: the error this rank carries to the planning collective (see :mod:`dcplan.failures`)
        self.failure: str | None = None
        self.skip_keys: set[str] = set()
        self.missing_keys: list[str] = []
        self.mismatches: list[Mismatch] = []
        self.report: LoadReport | None = None
        self.original_state_dict: dict[str, Any] = {}
        self.mappings: dict[str, Any] = {}
        self.metadata: Metadata | None = None
        self.is_coordinator = False
        self.load_session: Any = None
        self.load_stats: Any = None
        compat.install_metadata_format_guard()
        try:
            self._configure(config, overrides)
        except Exception as exc:
            carry(self, exc, "LoadPlanner()")

    def _configure(self, config: Config | Mapping[str, Any] | None, overrides: dict[str, Any]) -> None:
        self.config, self.config_sources = resolve_config(config, overrides)
        self._check_partial_load_plugin()
        # -- load strategy (dcplan_register_load_strategies; see dcplan.load.strategy)
        self.load_strategy = self.plugin_manager.get_load_strategy(self.config.load_strategy)
        self.load_strategy_options = self.load_strategy.resolve_options(self.config.load_strategy_options)
        from dcplan.load.safe import check_trusted_globals

        check_trusted_globals(self.config)

    def _check_partial_load_plugin(self) -> None:
        """``partial_load``/``skip_mismatch_keys`` without a plugin would silently load strictly."""
        wanted = [k for k in ("partial_load", "skip_mismatch_keys") if getattr(self.config, k)]
        if not wanted:
            return
        pm = self.plugin_manager
        builtin = set(getattr(pm, "_builtin", ()))
        impls = [i for i in pm.hook.dcplan_missing_keys_policy.get_hookimpls() if i.plugin_name not in builtin]
        if impls:
            return
        where = ", ".join(f"{k} from {self.config_sources.get(k, '?')}" for k in wanted)
        raise ConfigError(
            f"{' and '.join(wanted)} is set ({where}) but no installed, enabled plugin implements partial "
            "loads, so the load would be strict: pip install dcplan-partial-load (and make sure "
            "DCPLAN_LOAD_PLUGINS/DCPLAN_DISABLE_PLUGINS do not exclude 'partial_load'), or unset "
            f"{' and '.join(wanted)}"
        )

    # -- planning ----------------------------------------------------------
    def set_up_planner(
        self, state_dict: dict[str, Any], metadata: Metadata | None = None, is_coordinator: bool = False
    ) -> None:
        if metadata is None:
            raise ValueError("dcplan.LoadPlanner needs the checkpoint metadata (torch passes it to set_up_planner)")
        self.metadata = metadata
        self.is_coordinator = is_coordinator
        self.original_state_dict = state_dict
        if self.failure is None:
            try:
                self._set_up(state_dict, metadata, is_coordinator)
            except Exception as exc:
                carry(self, exc, "set_up_planner")

    def _set_up(self, state_dict: dict[str, Any], metadata: Metadata, is_coordinator: bool) -> None:
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
        """The user's nested spelling of a flattened key, e.g. ``optim['state'][0]['exp_avg']``."""
        path = self.mappings.get(fqn)
        if not path:
            return fqn
        return format_path(_user_path(self.original_state_dict, path))

    def checkpoint_nested_key(self, fqn: str) -> str:
        """The nested spelling the checkpoint's ``planner_data`` records for ``fqn`` (if any)."""
        pd = getattr(self.metadata, "planner_data", None)
        path = pd.get(fqn) if isinstance(pd, Mapping) else None
        if isinstance(path, (tuple, list)) and path:
            return format_path(path)
        return fqn

    def _maybe_old_format(self) -> None:
        """Checkpoints from torch <= 2.3 flattened lists differently."""
        if not self.flatten_state_dict:
            return
        assert self.metadata is not None
        keys = self.metadata.state_dict_metadata
        missing = [k for k in self.state_dict if k not in keys]
        if not missing:
            return
        old = compat.old_format_flatten(self.original_state_dict)
        if old is None:
            return
        old_sd, old_map = old
        if len([k for k in old_sd if k not in keys]) < len(missing):
            self.state_dict, self.mappings = old_sd, old_map

    def _find_mismatches(self) -> list[Mismatch]:
        assert self.metadata is not None
        return find_mismatches(self.state_dict, self.metadata, self.nested_key)

    def create_local_plan(self) -> LoadPlan:
        if self.metadata is None:
            raise RuntimeError("dcplan.LoadPlanner.create_local_plan called before set_up_planner")
        if self.failure is None:
            try:
                return self._create_local_plan()
            except Exception as exc:
                carry(self, exc, "create_local_plan")
        # this rank failed: it still joins the collective, with its error instead of a plan
        return LoadPlan([], planner_data={FAILURE_KEY: self.failure})

    def _create_local_plan(self) -> LoadPlan:
        assert self.metadata is not None
        self._maybe_old_format()
        md_keys = self.metadata.state_dict_metadata
        self.missing_keys = sorted(k for k in self.state_dict if k not in md_keys)
        self.mismatches = self._find_mismatches()
        self.skip_keys = set()
        if self.missing_keys:
            policy = self.hook.dcplan_missing_keys_policy(
                planner=self, missing=self.missing_keys, config=self.config
            )
            if policy == "skip":
                self.skip_keys = set(self.missing_keys)
            else:
                self.report = self._local_report()
                raise MissingKeysError(self.missing_keys, [self.nested_key(k) for k in self.missing_keys])
        plan = self.hook.dcplan_create_local_load_plan(
            planner=self, state_dict=self.state_dict, metadata=self.metadata
        )
        self.report = self._local_report()
        pd = plan.planner_data
        if pd is None or isinstance(pd, dict):  # another plugin's planner_data is kept as it is
            plan = dataclasses.replace(
                plan, planner_data={**(pd or {}), REPORT_KEY: self.report, LOAD_INFO_KEY: self._load_info()}
            )
        self.plan = plan
        return plan

    def _local_report(self) -> LoadReport:
        assert self.metadata is not None
        requested = self.state_dict
        unexpected = sorted(k for k in self.metadata.state_dict_metadata if k not in requested)
        return LoadReport(
            missing=_pairs(self.missing_keys, [self.nested_key(k) for k in self.missing_keys]),
            unexpected=_pairs(unexpected, [self.checkpoint_nested_key(k) for k in unexpected]),
            mismatched=tuple(self.mismatches),
            skipped=tuple(sorted(self.skip_keys)),
        )

    def create_global_plan(self, global_plan: list[LoadPlan]) -> list[LoadPlan]:
        raise_carried(
            (
                (r, p.planner_data.get(FAILURE_KEY) if isinstance(p.planner_data, Mapping) else None)
                for r, p in enumerate(global_plan)
            ),
            "load",
        )
        reports = []
        for plan in global_plan:
            data = plan.planner_data
            if isinstance(data, Mapping) and isinstance(data.get(REPORT_KEY), LoadReport):
                reports.append(data[REPORT_KEY])
        if reports:
            self.report = LoadReport.merge(reports)
            if self.config.report:
                rep = self.report
                level = logging.WARNING if rep.missing or rep.mismatched else logging.INFO
                level = logging.DEBUG if rep.clean else level
                log.log(level, "%s", self.report.format())
        plans = [_strip_report(p) for p in global_plan]
        return self.hook.dcplan_create_global_load_plan(planner=self, all_plans=plans)

    def finish_plan(self, new_plan: LoadPlan) -> LoadPlan:
        start = self.load_strategy.start
        self.load_stats = None
        self.load_session = None if start is None else start(self, new_plan, self.load_strategy_options)
        return new_plan

    # -- load strategy: what a strategy's session adds to the data path ------
    def _load_info(self) -> tuple[str, Any]:
        """This rank's load strategy and its ``local_info``, sent to the coordinator."""
        local = self.load_strategy.local_info
        info = None if local is None else local(self, self.load_strategy_options)
        return (self.load_strategy.name, info)

    def finish_reads(
        self, plan: LoadPlan, read: Any = None, error: BaseException | None = None
    ) -> None:
        """Called once by the storage reader after this rank's own reads (see dcplan.load.strategy).

        :param plan: the plan the reader read.
        :param read: ``read(plan)`` reads more items of the checkpoint the same way, or ``None``.
        :param error: what this rank's reads raised, if anything; re-raised after the
            strategy's session has told the other ranks (so no rank waits for it).
        """
        session = self.load_session
        try:
            if session is not None:
                session.finish_reads(plan, read, error)
        finally:
            self.load_session = None
        if error is not None:
            raise error

    # -- data ------------------------------------------------------------
    def unpickle(self, fqn: str, value: io.BytesIO) -> Any:
        """Restore a non-tensor item safely (see :func:`dcplan.load.safe.load_object`)."""
        from dcplan.load.safe import load_object

        return load_object(self, fqn, value)

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        if self.load_session is not None and self.load_session.load_bytes(read_item, value):
            return
        fqn = read_item.dest_index.fqn
        obj = self.unpickle(fqn, value)
        if self.flatten_state_dict:
            compat.set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            # the user's dict, not only the (possibly re-built) working copy: torch's
            # DefaultLoadPlanner drops non-tensor values here
            self.state_dict[fqn] = obj
            if self.original_state_dict is not self.state_dict:
                self.original_state_dict[fqn] = obj

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        if self.load_session is not None:
            staged = self.load_session.resolve_tensor(read_item)
            if staged is not None:
                return staged
        tensor = compat.find_state_dict_object(self.state_dict, read_item.dest_index)
        return compat.narrow_tensor_by_index(tensor, read_item.dest_offsets, read_item.lengths)

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        if self.load_session is not None and self.load_session.commit_tensor(read_item, tensor):
            return
        super().commit_tensor(read_item, tensor)
