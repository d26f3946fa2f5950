"""dcplan's built-in behaviour, registered as a plugin through the same hooks.

It is registered before every entry-point plugin and marked ``trylast`` so that
a third-party implementation of a ``firstresult`` hook always runs first.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from dcplan import compat
from dcplan.load.strategy import check_agreement, default_load_strategy
from dcplan.manager import hookimpl
from dcplan.save.local import create_local_save_plan
from dcplan.save.metadata import build_global_plan
from dcplan.save.validate import validate_global_plan
from dcplan.types import LoadStrategy, Strategy

if TYPE_CHECKING:  # pragma: no cover
    from dcplan.compat import LoadPlan, Metadata, SavePlan


def _torch_strategy(all_plans: Sequence[SavePlan], save_to_lowest_rank: bool = False) -> list[SavePlan]:
    return compat.torch_dedup_save_plans(all_plans, save_to_lowest_rank=save_to_lowest_rank)


@hookimpl(trylast=True)
def dcplan_register_strategies() -> list[Strategy]:
    return [
        Strategy(
            name="torch",
            func=_torch_strategy,
            description="torch's own dedup_save_plans, unchanged (the baseline)",
            options={"save_to_lowest_rank": False},
        )
    ]


@hookimpl(trylast=True)
def dcplan_register_load_strategies() -> list[LoadStrategy]:
    return [default_load_strategy()]


@hookimpl(trylast=True)
def dcplan_create_local_save_plan(planner: Any, state_dict: dict[str, Any], is_coordinator: bool) -> SavePlan:
    return create_local_save_plan(state_dict)


@hookimpl(trylast=True)
def dcplan_dedup(
    all_plans: Sequence[SavePlan], strategy: Strategy, options: dict[str, Any], config: Any, index: Any = None
) -> list[SavePlan]:
    return list(strategy.run(list(all_plans), options, index))


@hookimpl(trylast=True)
def dcplan_create_save_metadata(all_plans: Sequence[SavePlan], config: Any) -> tuple[list[SavePlan], Metadata]:
    global_plan, metadata, errors = build_global_plan(all_plans)
    if errors:
        from dcplan.errors import PlanValidationError

        raise PlanValidationError(errors)
    return global_plan, metadata


@hookimpl(trylast=True)
def dcplan_validate_global_plan(global_plan: Sequence[SavePlan], metadata: Metadata) -> list[str]:
    return validate_global_plan(global_plan, metadata)


@hookimpl(trylast=True)
def dcplan_finish_save_plan(planner: Any, central_plan: SavePlan, cache: Any) -> SavePlan:
    if cache is not None:
        return cache.finish(planner, central_plan)
    return central_plan


@hookimpl(trylast=True)
def dcplan_missing_keys_policy(planner: Any, missing: Sequence[str], config: Any) -> str:
    return "error"


@hookimpl(trylast=True)
def dcplan_create_local_load_plan(planner: Any, state_dict: dict[str, Any], metadata: Metadata) -> LoadPlan:
    from dcplan.load.report import find_mismatches

    skip: set[str] = getattr(planner, "skip_keys", set())
    found = getattr(planner, "mismatches", None)
    if found is None:
        found = find_mismatches(state_dict, metadata)
    mismatches = [
        f"{m.key}: checkpoint {m.checkpoint_shape} vs state dict {m.state_dict_shape}"
        for m in found
        if m.shape_differs and m.key not in skip
    ]
    if mismatches:
        raise ValueError(
            f"size mismatch between the checkpoint and the state dict for {len(mismatches)} key(s): "
            + "; ".join(mismatches)
            + ". Resize the model to match, or allow skipping these keys "
            "(dcplan-partial-load with skip_mismatch_keys)"
        )
    requests = []
    for fqn, obj in state_dict.items():
        if fqn in skip or not compat.dtensor_on_this_rank(obj):
            continue
        requests += compat.create_read_items(fqn, metadata.state_dict_metadata[fqn], obj)
    return compat.LoadPlan(requests)


@hookimpl(trylast=True)
def dcplan_create_global_load_plan(planner: Any, all_plans: Sequence[LoadPlan]) -> list[LoadPlan]:
    strategy = getattr(planner, "load_strategy", None)
    if strategy is None:
        return list(all_plans)
    check_agreement(all_plans, strategy.name)
    return list(strategy.func(list(all_plans), planner, **planner.load_strategy_options))
