"""No hidden state: the plan index travels as an argument, the plan cache returns what it computed."""

from __future__ import annotations

import collections

import pytest

import dcplan
from dcplan.testing.plans import replicated_plans, tensor_item


def _written(plans) -> collections.Counter:
    return collections.Counter((i.index.fqn, tuple(i.index.offset)) for p in plans for i in p.items)


def _held(plans) -> set:
    return {(i.index.fqn, tuple(i.index.offset)) for p in plans for i in p.items}


@pytest.mark.parametrize("strategy", ["size_balanced", "split", "torch", "lowest_rank"])
def test_editing_a_plan_in_place_and_planning_again_is_correct(strategy: str) -> None:
    plans = replicated_plans(3, [tensor_item(f"w{i}", (64, 4 + i)) for i in range(6)])
    # whole items only (split's default would slice even these small tensors), so keys can be counted
    options = {"min_slice_bytes": 1 << 20} if strategy == "split" else {}
    planner = dcplan.SavePlanner(strategy=strategy, strategy_options=options, report=False, validate=True)
    first, _ = planner.plan_global(plans)
    assert _written(first) == collections.Counter(_held(plans))
    dcplan.dedup(plans, strategy, **options)
    # same plan objects, same lengths, other items: nothing may answer from an old index
    for p in plans:
        p.items[0] = tensor_item("renamed", (32, 3))
        p.items[-1] = tensor_item("other", (5,))
    want = collections.Counter(_held(plans))
    assert ("w0", (0, 0)) not in want
    assert _written(dcplan.dedup(plans, strategy, **options)) == want
    again, md = planner.plan_global(plans)
    assert _written(again) == want
    assert {"renamed", "other"} <= set(md.state_dict_metadata)


class _Reports:
    def __init__(self) -> None:
        self.reports: list = []

    @dcplan.hookimpl
    def dcplan_plan_report(self, report, config) -> None:
        self.reports.append(report)


def test_the_report_is_published_once_per_save_cache_hit_and_miss(tmp_path) -> None:
    import torch
    import torch.distributed.checkpoint as dcp

    from dcplan.manager import DcplanPluginManager
    from dcplan.save.cache import CacheStore, PlanCache

    spy = _Reports()
    pm = DcplanPluginManager(extra_plugins=[("spy", spy)])
    store = CacheStore()
    sd = {"w": torch.ones(4), "step": 3}
    outcomes = []
    for n in range(3):
        planner = dcplan.SavePlanner(dcplan.Config(plan_cache=True), plugin_manager=pm)
        planner.cache = PlanCache(planner.config, store=store)
        dcp.save(sd, checkpoint_id=str(tmp_path / f"c{n}"), planner=planner)
        outcomes.append(planner.cache.outcome)
        assert len(spy.reports) == n + 1, outcomes
        assert planner.report is spy.reports[-1]
    assert outcomes == ["miss", "hit", "hit"]
