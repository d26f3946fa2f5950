"""The core verifies every save, whatever a plugin does (issue 13), without processes."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import dcplan
from dcplan.compat import SavePlan
from dcplan.errors import PlanValidationError, StrategyError
from dcplan.save import verify
from dcplan.save.index import index_plans
from dcplan.testing.plans import bytes_item, replicated_plans, tensor_item


def _hsdp() -> list[SavePlan]:
    """4 ranks: two shards of w, each held by two ranks; a replicated bias and step."""
    per_rank: list[list] = [[] for _ in range(4)]
    for shard in range(2):
        it = tensor_item("w", (8, 4), (4 * shard, 0), (4, 4))
        per_rank[shard].append(it)
        per_rank[shard + 2].append(it)
    for r in range(4):
        per_rank[r] += [tensor_item("b", (64,)), bytes_item("step", 8)]
    return [SavePlan(items) for items in per_rank]


def _violations(plans, out) -> list[str]:
    found = verify.find_violations(index_plans(plans), out, keep=50)
    return found.shown


@pytest.mark.parametrize("strategy", ["size_balanced", "split", "torch", "lowest_rank"])
def test_builtin_strategies_pass_verification(strategy: str) -> None:
    plans = _hsdp()
    opts = {"min_slice_bytes": 16} if strategy == "split" else {}
    assert _violations(plans, dcplan.dedup(plans, strategy, **opts)) == []


def test_verification_names_each_kind_of_violation() -> None:
    plans = _hsdp()
    good = dcplan.dedup(plans, "size_balanced")
    dropped = [dataclasses.replace(p, items=[i for i in p.items if i.index.fqn != "step"]) for p in good]
    assert any("'step' is held by ranks [0, 1, 2, 3] but no rank writes it" in v for v in _violations(plans, dropped))
    invented = [dataclasses.replace(p, items=p.items + [tensor_item("ghost", (2,))]) if r == 0 else p
                for r, p in enumerate(good)]
    assert any("rank 0 writes 'ghost', which no rank holds" in v for v in _violations(plans, invented))
    shard1 = plans[1].items[0]
    non_holder = [dataclasses.replace(p, items=[i for i in p.items if i.index.fqn != "w" or r == 0])
                  for r, p in enumerate(good)]
    non_holder[0] = dataclasses.replace(non_holder[0], items=non_holder[0].items + [shard1])
    found = _violations(plans, non_holder)
    assert any("rank 0 writes w[4:8, 0:4], which it does not hold (holders: ranks [1, 3])" in v for v in found), found
    misindexed = [dataclasses.replace(p, items=[
        dataclasses.replace(i, index=dataclasses.replace(i.index, offset=torch.Size([0, 0]))) if i.index.fqn == "w"
        else i for i in p.items]) for p in good]
    found = _violations(plans, misindexed)
    assert any("MetadataIndex.offset (0, 0), not its chunk offset (4, 0)" in v for v in found), found


def test_a_violation_raises_before_any_metadata_naming_strategy_and_fix() -> None:
    pm = dcplan.manager.DcplanPluginManager(env={})

    class Drop:
        @dcplan.hookimpl
        def dcplan_register_strategies(self):
            return [dcplan.Strategy("drop_all", lambda plans: [SavePlan([]) for _ in plans])]

    pm.register(Drop(), "drop-plugin")
    planner = dcplan.SavePlanner(strategy="drop_all", plugin_manager=pm)
    with pytest.raises(StrategyError) as info:
        planner.plan_global(_hsdp())
    msg = str(info.value)
    assert "strategy 'drop_all' (distribution drop-plugin)" in msg and "nothing was written" in msg
    assert "A strategy must give every item" in msg and "dropped" in msg
    assert info.value.total == 4 and len(info.value.violations) == 4
    # turning validation off is an explicit choice
    dcplan.SavePlanner(strategy="drop_all", plugin_manager=pm, validate=False).plan_global(_hsdp())


def test_replicated_key_with_different_dtypes_is_refused_before_dedup() -> None:
    plans = replicated_plans(3, [tensor_item("w", (4, 4))])
    plans[2] = SavePlan([tensor_item("w", (4, 4), dtype=torch.bfloat16)])
    with pytest.raises(PlanValidationError) as info:
        dcplan.SavePlanner(strategy="size_balanced").plan_global(plans)
    msg = str(info.value)
    assert "ranks disagree on key 'w'" in msg
    assert "ranks [0, 1] have a float32 tensor of global size (4, 4); rank [2] has a bfloat16 tensor" in msg
    obj = replicated_plans(2, [tensor_item("x", (3,))])
    obj[1] = SavePlan([bytes_item("x", 8)])
    with pytest.raises(PlanValidationError, match="an object"):
        dcplan.SavePlanner(strategy="lowest_rank").plan_global(obj)


def test_strategy_options_are_checked_when_the_planner_is_built() -> None:
    with pytest.raises(ValueError, match="max_slices must be an integer >= 1"):
        dcplan.SavePlanner(strategy="split", strategy_options={"max_slices": 0})
    with pytest.raises(ValueError, match="unknown mode 'fast'"):
        dcplan.SavePlanner(strategy="size_balanced", strategy_options={"mode": "fast"})


def test_load_without_flattening_restores_non_tensor_values(tmp_path) -> None:
    import torch.distributed.checkpoint as dcp

    path = str(tmp_path / "ck")
    dcp.save({"w": torch.arange(4.0), "step": 9, "meta": {"lr": 0.5}}, checkpoint_id=path,
             planner=dcplan.SavePlanner(flatten_state_dict=False))
    target = {"w": torch.zeros(4), "step": 0, "meta": {"lr": 0.0}}
    dcp.load(target, checkpoint_id=path, planner=dcplan.LoadPlanner(flatten_state_dict=False))
    assert target["step"] == 9 and target["meta"] == {"lr": 0.5} and torch.equal(target["w"], torch.arange(4.0))


# ---------------------------------------------------------------- the conformance kit
ADVERSARIAL = {
    "adv_drop": "exactly_once",
    "adv_invent": "holder_only",
    "adv_misindex": "index_offset",
    "adv_non_holder": "holder_only",
    "adv_overlap_slices": ("exactly_once", "item_intact"),
    "adv_dtype": "item_intact",
    "adv_raising": "no_error",
    "adv_slow": "scales_linearly",
}


@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
def test_kit_rejects_each_adversarial_plugin(monkeypatch, name) -> None:
    pytest.importorskip("dcplan_adversarial", reason="tools/install_local.py --tests installs it")
    from dcplan.manager import reset_plugin_manager
    from dcplan.testing import kit

    monkeypatch.setenv("TEST_DCPLAN_ADVERSARIAL", "1")
    reset_plugin_manager()
    with pytest.raises(kit.ConformanceError) as info:
        # adv_slow is correct on every workload: only the timing catches it (large workloads add nothing)
        kit.check_strategy(name, max_examples=60, hash_seeds=(), large=name != "adv_slow")
    want = ADVERSARIAL[name]
    assert info.value.invariant in (want if isinstance(want, tuple) else (want,)), str(info.value)
    assert f"[{info.value.invariant}]" in str(info.value)


def only_small_worlds(all_plans):
    """Bug: correct up to 16 ranks, then drops every item only rank 16+ would write."""
    from dcplan_lowest_rank import lowest_rank

    out = lowest_rank(all_plans)
    return [p if r < 16 else dataclasses.replace(p, items=[]) for r, p in enumerate(out)]


def test_kit_finds_a_bug_that_needs_many_ranks_and_shrinks_it() -> None:
    from dcplan.testing import kit

    with pytest.raises(kit.ConformanceError) as info:
        kit.check_strategy(only_small_worlds, max_examples=30, hash_seeds=(), scaling=False)
    err = info.value
    assert err.invariant == "exactly_once" and "dropped" in str(err)
    assert err.plans is not None and sum(len(p.items) for p in err.plans) < 200  # shrunk from thousands


def test_kit_rejects_an_index_offset_that_differs_from_the_chunk() -> None:
    from dcplan.testing import kit

    plans = _hsdp()
    with pytest.raises(kit.ConformanceError, match=r"\[index_offset\].*not its chunk offset \(4, 0\)"):
        kit.check_plans(_misindex, plans)


def _misindex(all_plans):
    out = dcplan.dedup(all_plans, "lowest_rank")
    return [dataclasses.replace(p, items=[
        dataclasses.replace(i, index=dataclasses.replace(i.index, offset=torch.Size([0, 0]))) if i.index.fqn == "w"
        else i for i in p.items]) for p in out]


def test_kit_reports_one_conformance_error_never_an_exception_group() -> None:
    """Two different bugs (overlapping slices and drops) on different workloads: still one ConformanceError."""
    from dcplan.testing import kit

    def two_bugs(all_plans):
        out = dcplan.dedup(all_plans, "lowest_rank")
        if len(all_plans) > 2:
            return [dataclasses.replace(p, items=p.items[1:]) for p in out]
        return [dataclasses.replace(p, items=p.items + p.items[:1]) for p in out]

    with pytest.raises(kit.ConformanceError):
        kit.check_strategy(two_bugs, max_examples=100, hash_seeds=(), large=False, scaling=False)
