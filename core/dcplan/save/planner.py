"""``dcplan.SavePlanner``: a drop-in for torch's ``DefaultSavePlanner``.

It speaks torch's planner protocol (``set_up_planner`` / ``create_local_plan`` /
``create_global_plan`` / ``finish_plan`` / ``resolve_data``) and runs each step
through dcplan's hooks, so strategies come from plugins picked by config.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import time
from collections.abc import Mapping
from typing import Any

import attrs
import torch

from dcplan import compat
from dcplan.compat import MetadataIndex, SavePlan, WriteItem, WriteItemType
from dcplan.config import Config, resolve_config
from dcplan.errors import DcplanError, PlanMismatchError, PlanValidationError, PluginError
from dcplan.failures import carry, raise_carried
from dcplan.manager import DcplanPluginManager, HookedPlannerMixin
from dcplan.save import exchange, wire
from dcplan.save.local import plan_digest
from dcplan.save.store import PlanStore

__all__ = ["SavePlanner", "RankPayload"]

log = logging.getLogger("dcplan")


@attrs.frozen
class RankPayload:
    """What a rank sends to the coordinator in ``SavePlan.planner_data``.

    ``mapping`` is torch's flattening mapping (it ends up merged in the
    checkpoint's ``Metadata.planner_data``); ``agreement`` is what every rank must
    share (strategy, options, plugins); ``cache`` is the plan cache's message;
    ``digest`` is :func:`dcplan.save.local.plan_digest` of the rank's full local
    plan, so the coordinator indexes identical plans once; ``failure`` is the
    error this rank's planner carries instead of a plan; ``host`` is the
    rank's host name (:func:`rank_host`): ranks sharing a host form a node.
    """

    mapping: Any
    agreement: tuple[Any, ...]
    cache: Any = None
    digest: bytes | None = None
    #: ``"ErrorType: message (in step)"`` when this rank's planner failed (see :mod:`dcplan.failures`)
    failure: str | None = None
    host: str | None = None


def rank_host(config: Config | None = None) -> str:
    """This rank's host name: the ``host`` config key (env ``DCPLAN_HOST``) when set, else ``socket.gethostname()``."""
    import socket

    if config is None:
        config = resolve_config()[0]
    return config.host or socket.gethostname()


def _strategy_view(local_plans: list[SavePlan]) -> list[SavePlan]:
    """The plans a strategy is given: the same items in lists of its own (one per distinct list).

    The core keeps using the lists the ranks sent (the index, the verification
    and the compact final plans are positions into them), so a strategy that
    mutates ``all_plans`` despite the contract (sorts, pops, appends) cannot make
    a rank write other items than the ones the coordinator verified.
    """
    copies: dict[int, list[WriteItem]] = {}  # (a map local to this call)
    out = []
    for plan in local_plans:
        items = plan.items
        mine = copies.get(id(items))
        if mine is None:
            mine = copies[id(items)] = list(items)
        out.append(compat.replace_plan(plan, items=mine))
    return out


class SavePlanner(HookedPlannerMixin, compat.DefaultSavePlanner):  # type: ignore[misc]
    """Drop-in ``SavePlanner`` whose dedup strategy comes from config and plugins.

    The protocol, as ``dcp.save`` drives it (step -> hook -> module):

    0. ``SavePlanner()`` (every rank): config, strategy and its options
       (``Strategy.check_options``) are resolved; inside a process group an error is
       kept and carried to step 3 (:mod:`dcplan.failures`) instead of raised alone.
    1. :meth:`set_up_planner` (every rank): flatten the state dict -> torch's
       flattening (:mod:`dcplan.compat`).
    2. :meth:`create_local_plan` (every rank): the rank's items ->
       ``dcplan_create_local_save_plan`` -> :mod:`dcplan.save.local`; plus the
       :class:`RankPayload` (agreement, digest, cache message, carried failure).
    3. gather; :meth:`create_global_plan` (coordinator): carried failures and
       agreement are checked; the plan cache may answer (:mod:`dcplan.save.cache`);
       else :meth:`plan_global`:

       a. index who holds what -> :mod:`dcplan.save.index` (built once, passed on);
       b. holders of each key agree on kind, dtype, size -> :mod:`dcplan.save.verify`;
       c. dedup -> ``dcplan_dedup`` -> the strategy (a plugin, gets ``index=``);
       d. the strategy's output is verified -> :mod:`dcplan.save.verify`;
       e. metadata -> ``dcplan_create_save_metadata`` -> :mod:`dcplan.save.metadata`;
       f. validation -> ``dcplan_validate_global_plan`` -> :mod:`dcplan.save.validate`;
       g. report -> ``dcplan_plan_report`` -> :mod:`dcplan.save.report` (once per save).

       Steps b, d and f run when ``validate`` is on (the default).
    4. scatter; :meth:`finish_plan` (every rank): -> ``dcplan_finish_save_plan``
       (-> :mod:`dcplan.save.cache` when caching).
    5. write (every rank): the storage writer calls :meth:`resolve_data`.

    :param config: a :class:`dcplan.Config` (used as is) or ``None`` to read
        ``DCPLAN_*`` env vars, ``dcplan.toml`` and ``[tool.dcplan]``.
    :param flatten_state_dict: flatten nested dicts (as torch's default does).
    :param flatten_sharded_tensors: flatten nested ShardedTensors (2-D FSDP).
    :param plugin_manager: a specific plugin manager (tests); default: the
        process-wide one.
    :param process_group: the process group ``dcp.save`` runs on (default: the
        default group); the planner exchanges plan digests on it so identical
        plans are gathered once (:mod:`dcplan.save.exchange`).
    :param overrides: any :class:`Config` key, e.g. ``strategy="lowest_rank"``.
    """

    def __init__(
        self,
        config: Config | Mapping[str, Any] | None = None,
        *,
        flatten_state_dict: bool = True,
        flatten_sharded_tensors: bool = True,
        plugin_manager: DcplanPluginManager | None = None,
        process_group: Any = None,
        **overrides: Any,
    ) -> None:
        compat.DefaultSavePlanner.__init__(
            self, flatten_state_dict=flatten_state_dict, flatten_sharded_tensors=flatten_sharded_tensors
        )
        self._pm = plugin_manager
        self.report: Any = None
        self.timings: dict[str, float] = {}
        self.mappings: dict[str, Any] = {}
        self._local_chunks: dict[str, list[tuple[Any, MetadataIndex]]] = {}
        self.process_group = process_group
        self._sent_items: list[WriteItem] = []
        self.plan_store: PlanStore | None = None
        self.cache: Any = None
        #: the error this rank carries to the planning collective (see :mod:`dcplan.failures`)
        self.failure: str | None = None
        compat.install_metadata_format_guard()
        try:
            self._configure(config, overrides)
        except Exception as exc:
            carry(self, exc, "SavePlanner()")

    def _configure(self, config: Config | Mapping[str, Any] | None, overrides: dict[str, Any]) -> None:
        self.config, self.config_sources = resolve_config(config, overrides)
        # the default strategy falls back to the built-in `torch` when dcplan-size-balanced is absent
        explicit = self.config_sources.get("strategy", "default") != "default"
        self.strategy = self.plugin_manager.resolve_strategy(self.config.strategy, explicit=explicit)
        self.strategy_options = self.strategy.resolve_options(self.config.strategy_options)
        if self.config.plan_cache:
            from dcplan.save.cache import PlanCache

            self.cache = PlanCache.for_config(self.config)

    def agreement(self) -> tuple[Any, ...]:
        """What all ranks must share; compared by the coordinator."""
        return (
            self.strategy.name,
            repr(sorted(self.strategy_options.items())),
            self.plugin_manager.fingerprint(),
            self.config.plan_cache,
            self.config.validate,
        )

    # -- protocol --------------------------------------------------------
    def set_up_planner(
        self, state_dict: dict[str, Any], storage_meta: Any = None, is_coordinator: bool = False
    ) -> None:
        if isinstance(storage_meta, bool):  # (state_dict, is_coordinator) callers
            storage_meta, is_coordinator = None, storage_meta
        self.storage_meta = storage_meta
        self.is_coordinator = is_coordinator
        if self.failure is None:
            try:
                self._set_up(state_dict)
            except Exception as exc:
                carry(self, exc, "set_up_planner")

    def _set_up(self, state_dict: dict[str, Any]) -> None:
        self.original_state_dict = state_dict
        if self.flatten_state_dict:
            state_dict, self.mappings = compat.flatten_state_dict(state_dict)
        else:
            self.mappings = {}
        if self.flatten_sharded_tensors:
            state_dict = compat.flatten_sharded_tensors(state_dict)
        self.state_dict = state_dict

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["process_group"] = None  # not picklable; the exchange then checks the group again
        return state

    def create_local_plan(self) -> SavePlan:
        how = exchange.resolve(self.process_group, compat.dcp_save_context())
        plan = None
        if self.failure is None:
            try:
                plan = self._create_local_plan()
                self.plan_store = PlanStore.for_planner(self) if how.exchange else None
            except Exception as exc:
                carry(self, exc, "create_local_plan")
        if self.failure is not None:
            # this rank failed: it still joins the collectives (the digest exchange, then the
            # gather), with its error instead of a plan, so that no peer waits for it
            exchange.send_plan(None, how, failed=True)
            return SavePlan([], planner_data=RankPayload(mapping=None, agreement=(), failure=self.failure))
        return exchange.send_plan(plan, how, store=self.plan_store)  # type: ignore[no-any-return]

    def _create_local_plan(self) -> SavePlan:
        t0 = time.perf_counter()
        plan = self.hook.dcplan_create_local_save_plan(
            planner=self, state_dict=self.state_dict, is_coordinator=self.is_coordinator
        )
        mapping = self.mappings if self.flatten_state_dict else None
        plan = compat.replace_plan(plan, planner_data=mapping)
        self._local_chunks = {}
        for item in plan.items:
            if item.tensor_data is not None and item.tensor_data.chunk is not None:
                self._local_chunks.setdefault(item.index.fqn, []).append((item.tensor_data.chunk, item.index))
        self.plan = plan
        self._sent_items = plan.items
        digest = plan_digest(plan.items)
        cache_msg = None
        if self.cache is not None:
            plan, cache_msg = self.cache.local_step(self, plan)
        payload = RankPayload(
            mapping=plan.planner_data, agreement=self.agreement(), cache=cache_msg, digest=digest, host=rank_host(self.config)
        )
        self.timings["local"] = time.perf_counter() - t0
        return compat.replace_plan(plan, planner_data=payload)

    def _check_agreement(self, payloads: list[RankPayload]) -> None:
        first = payloads[0].agreement
        bad = [r for r, p in enumerate(payloads) if p.agreement != first]
        if not bad:
            return
        lines = []
        for r, p in enumerate(payloads):
            if r == 0 or r in bad:
                strategy, options, plugins, cache, validate = p.agreement
                plugs = ", ".join(f"{n}=={v}" if v else n for n, v in plugins)
                lines.append(
                    f"rank {r}: strategy={strategy} options={options} plan_cache={cache} "
                    f"validate={validate} plugins=[{plugs}]"
                )
        raise PlanMismatchError(
            "dcplan: ranks disagree on the save strategy or plugin set, nothing was written. "
            "Make config (DCPLAN_* env, dcplan.toml, pyproject.toml) and installed dcplan "
            "plugins identical on every node. " + " | ".join(lines)
        )

    def create_global_plan(self, all_plans: list[SavePlan]) -> tuple[list[SavePlan], Any]:
        t0 = time.perf_counter()
        if wire.all_stored(all_plans) and self.plan_store is not None:  # persistent store hit
            delta, self.metadata = self.plan_store.replay()
            self.global_plan, self.report = delta, None
            self.timings["global"] = time.perf_counter() - t0
            return delta, self.metadata
        compact = wire.is_compact(all_plans)
        all_plans = wire.unpack_gathered(all_plans, RankPayload)
        payloads = []
        for r, p in enumerate(all_plans):
            if not isinstance(p.planner_data, RankPayload):
                raise PlanMismatchError(
                    f"dcplan: rank {r} did not use dcplan.SavePlanner; every rank must use the "
                    "same planner class"
                )
            payloads.append(p.planner_data)
        raise_carried(((r, pl.failure) for r, pl in enumerate(payloads)), "save")
        self._check_agreement(payloads)
        cached = None
        if self.cache is not None:
            cached = self.cache.global_step(self, all_plans, payloads)
        if cached is not None:
            delta, self.global_plan, self.metadata, self.report = cached
            self._publish_report(self.report, cached=True)
            self.timings["global"] = time.perf_counter() - t0
            return delta, self.metadata
        if self.cache is not None:
            local_plans = self.cache.full_local_plans(self, all_plans, payloads)
        else:
            local_plans = [
                compat.replace_plan(p, planner_data=pl.mapping) for p, pl in zip(all_plans, payloads)
            ]
        global_plan, metadata = self.plan_global(
            local_plans, digests=[pl.digest for pl in payloads], hosts=[getattr(pl, "host", None) for pl in payloads]
        )
        if self.cache is not None:
            delta = self.cache.commit_global(self, local_plans, global_plan, metadata, self.report)
        else:
            delta = global_plan
        if compact:
            delta = wire.pack_final(delta, local_plans)
            if self.plan_store is not None:
                self.plan_store.record(self.plan_store.digests, delta, metadata)
        self.global_plan = global_plan
        self.metadata = metadata
        self.timings["global"] = time.perf_counter() - t0
        return delta, metadata

    def _publish_report(self, report: Any, cached: bool) -> None:
        """Log the plan report (``report = true``) and call ``dcplan_plan_report``: once per save."""
        if report is None:
            return
        if self.config.report and hasattr(report, "summary"):
            log.info("%s%s", report.summary(), " (plan cache hit)" if cached else "")
        self.hook.dcplan_plan_report(report=report, config=self.config)

    def plan_global(
        self,
        local_plans: list[SavePlan],
        digests: list[bytes | None] | None = None,
        hosts: list[str | None] | None = None,
    ) -> tuple[list[SavePlan], Any]:
        """Dedup, metadata, validation and report on full local plans (no caching).

        Sets :attr:`report` and publishes it (``dcplan_plan_report``); on a plan
        cache hit :meth:`create_global_plan` publishes the cached one instead.

        :param digests: per rank, :func:`dcplan.save.local.plan_digest` of its plan
            (or ``None``): ranks with equal digests are indexed once.
        :param hosts: per rank, its host name (or ``None``): nodes for the report
            and for ``balance = "node"``.
        """
        from dcplan.gcpause import paused_gc
        from dcplan.save.index import index_plans

        with paused_gc():
            index = index_plans(local_plans, digests, hosts)  # built once, passed to the strategy and the report
            return self._plan_global(local_plans, index)

    def _plan_global(self, local_plans: list[SavePlan], index: Any) -> tuple[list[SavePlan], Any]:
        from dcplan.save import verify

        if self.config.validate:  # step 4a: holders of a key agree on kind, dtype, size
            verify.check_consistency(index, local_plans)
        try:
            deduped = self.hook.dcplan_dedup(
                all_plans=_strategy_view(local_plans),
                strategy=self.strategy,
                options=self.strategy_options,
                config=self.config,
                index=index,
            )
        except DcplanError:
            raise
        except Exception as exc:
            dist = self._strategy_distribution()
            raise PluginError(
                f"dcplan: strategy {self.strategy.name!r}"
                + (f" (distribution {dist})" if dist else "")
                + f" failed in dcplan_dedup: {type(exc).__name__}: {exc}; nothing was written. Fix or report "
                "the strategy, or choose another one (strategy = \"size_balanced\")"
            ) from exc
        if not isinstance(deduped, (list, tuple)) or len(deduped) != len(local_plans) or not all(
            isinstance(p, SavePlan) for p in deduped
        ):
            got = "nothing" if deduped is None else (
                f"{len(deduped)} plans" if isinstance(deduped, (list, tuple)) else type(deduped).__name__
            )
            raise PlanValidationError(
                [f"strategy {self.strategy.name!r} returned {got} for {len(local_plans)} ranks "
                 "(a strategy must return a list with one SavePlan per rank)"]
            )
        # the core owns each rank's flattening mapping: a strategy that builds new SavePlans (and drops
        # or changes planner_data) must not cost the checkpoint its mapping
        deduped = [
            d if d.planner_data is lp.planner_data else compat.replace_plan(d, planner_data=lp.planner_data)
            for d, lp in zip(deduped, local_plans)
        ]
        if self.config.validate:  # step 4b: the strategy's output, before any byte is written
            verify.verify_dedup(index, deduped, self.strategy.name, self._strategy_distribution())
        global_plan, metadata = self.hook.dcplan_create_save_metadata(all_plans=deduped, config=self.config)
        if not self.flatten_state_dict:
            metadata = dataclasses.replace(metadata, planner_data=None)
        if self.config.validate:
            errors = [e for errs in self.hook.dcplan_validate_global_plan(global_plan=global_plan, metadata=metadata) for e in errs]
            if errors:
                raise PlanValidationError(errors)
        from dcplan.save.report import build_report

        self.report = build_report(local_plans, global_plan, self.strategy.name, index=index)
        self._publish_report(self.report, cached=False)
        # ranks do not need the mappings back
        global_plan = [compat.replace_plan(p, planner_data=None) for p in global_plan]
        return global_plan, metadata

    def _strategy_distribution(self) -> str | None:
        reg = getattr(self.plugin_manager, "strategies", {}).get(self.strategy.name)
        return getattr(reg, "distribution", None)

    def finish_plan(self, new_plan: SavePlan) -> SavePlan:
        new_plan = wire.unpack_final(new_plan, self._sent_items)
        plan = self.hook.dcplan_finish_save_plan(planner=self, central_plan=new_plan, cache=self.cache)
        self.plan = plan
        return plan

    # -- data ------------------------------------------------------------
    def resolve_data(self, write_item: WriteItem) -> torch.Tensor | io.BytesIO:
        if write_item.type == WriteItemType.BYTE_IO:
            obj = compat.find_state_dict_object(self.state_dict, write_item.index)
            buf = io.BytesIO()
            torch.save(obj, buf)
            return buf
        chunk = write_item.tensor_data.chunk if write_item.tensor_data is not None else None
        base = self._containing_chunk(write_item.index.fqn, chunk)
        if base is None or chunk is None:
            return self.transform_object(write_item, self.lookup_object(write_item.index))
        local_chunk, local_index = base
        tensor = compat.find_state_dict_object(self.state_dict, local_index)
        if tuple(local_chunk.offsets) == tuple(chunk.offsets) and tuple(local_chunk.sizes) == tuple(chunk.sizes):
            return tensor
        offsets = [o - lo for o, lo in zip(chunk.offsets, local_chunk.offsets)]
        part = compat.narrow_tensor_by_index(tensor, offsets, chunk.sizes)
        return part.clone()

    def _containing_chunk(self, fqn: str, chunk: Any) -> tuple[Any, MetadataIndex] | None:
        if chunk is None:
            return None
        for local_chunk, index in self._local_chunks.get(fqn, ()):
            if all(
                lo <= o and o + s <= lo + ls
                for o, s, lo, ls in zip(chunk.offsets, chunk.sizes, local_chunk.offsets, local_chunk.sizes)
            ):
                return local_chunk, index
        return None
