"""The plan report: lower bound, per-rank bytes, busiest rank, tables; no processes."""

from __future__ import annotations

import itertools
import json
import logging
import math
import sys
from pathlib import Path

from hypothesis import given, settings

import dcplan
from dcplan import workloads
from dcplan.compat import SavePlan
from dcplan.fmt import fmt_bytes
from dcplan.save.index import fast_nbytes, holders_and_sizes, index_plans, nbytes_list
from dcplan.save.local import item_nbytes
from dcplan.save.report import build_report, compare_table, divisible_lower_bound, lower_bound
from dcplan.testing.plans import bytes_item, tensor_item

sys.path.insert(0, str(Path(__file__).parent))
from _balance_plans import layouts  # noqa: E402


def _t(name: str, nbytes: int):
    return tensor_item(name, (nbytes,), dtype=__import__("torch").uint8)


def _plans(world: int, placement: dict[str, tuple[int, tuple[int, ...]]]) -> list[SavePlan]:
    per = [[] for _ in range(world)]
    for name, (nbytes, ranks) in placement.items():
        it = _t(name, nbytes)
        for r in ranks:
            per[r].append(it)
    return [SavePlan(p) for p in per]


def _lb(plans: list[SavePlan]) -> int:
    h, s = holders_and_sizes(plans)
    return lower_bound(len(plans), h, s)


def test_lower_bound_terms() -> None:
    # largest item dominates a DDP group
    plans = _plans(4, {"a": (10, (0, 1, 2, 3)), "b": (10, (0, 1, 2, 3)), "c": (40, (0, 1, 2, 3))})
    assert _lb(plans) == 40
    # a fixed load dominates
    plans = _plans(2, {"mine": (100, (0,)), "r": (20, (0, 1))})
    assert _lb(plans) == 100
    # an item plus its holders' least fixed load
    plans = _plans(3, {"f0": (50, (0,)), "f1": (60, (1,)), "f2": (1, (2,)), "r": (30, (0, 1))})
    assert _lb(plans) == 80
    # nested groups: the inner pair must take its 100 bytes (average 50), the outer group only averages 33
    plans = _plans(4, {"x": (30, (0, 1)), "y": (30, (0, 1)), "z": (40, (0, 1)), "w": (20, (0, 1, 2, 3)),
                       "f": (10, (2,))})
    rep = build_report(plans, dcplan.dedup(plans, "size_balanced"))
    assert rep.lower_bound == 50 and "2 ranks" in rep.bound_reason
    # the outer group counts the inner group's bytes too: (100 + 20 + 10) / 4 -> 33 < 50
    h, s = holders_and_sizes(plans)
    assert divisible_lower_bound(4, h, s) == 50


def _brute_force(plans: list[SavePlan]) -> int:
    idx = index_plans(plans)
    best = None
    for choice in itertools.product(*idx.holders):
        load = [0] * len(plans)
        for r, b in zip(choice, idx.nbytes):
            load[r] += b
        best = max(load) if best is None else min(best, max(load))
    return best or 0


@settings(max_examples=120, deadline=None)
@given(layouts(max_world=4, max_tensors=4))
def test_bounds_are_valid_and_strategies_respect_them(plans: list[SavePlan]) -> None:
    idx = index_plans(plans)
    if math.prod(len(h) for h in idx.holders) > 5000:
        return
    opt = _brute_force(plans)
    rep = build_report(plans, dcplan.dedup(plans, "size_balanced"))
    assert rep.divisible_bound <= rep.lower_bound <= opt <= rep.busiest_bytes
    for name in ("torch", "lowest_rank"):
        assert build_report(plans, dcplan.dedup(plans, name)).busiest_bytes >= rep.lower_bound
    split = build_report(plans, dcplan.dedup(plans, "split", min_slice_bytes=1))
    assert split.busiest_bytes >= split.divisible_bound


def test_report_fields_and_tables() -> None:
    plans = _plans(3, {"a": (30, (0, 1, 2)), "b": (30, (0, 1, 2)), "c": (7, (1,)), "d": (5, (2,))})
    out = dcplan.dedup(plans, "size_balanced")
    rep = build_report(plans, out, "size_balanced")
    assert rep.bytes_per_rank == (30, 7, 35)  # fixed 7 and 5 first, then a -> rank 0, b -> rank 2
    assert rep.total_bytes == 72 and rep.world_size == 3 and rep.total_items == 4
    assert rep.busiest_bytes == max(rep.bytes_per_rank) and rep.bytes_per_rank[rep.busiest_rank] == rep.busiest_bytes
    assert rep.ratio == rep.busiest_bytes / rep.lower_bound
    assert "ratio" in rep.summary() and "size_balanced" in rep.summary()
    assert "<- busiest" in rep.table()
    json.dumps(rep.to_dict())
    torch_rep = build_report(plans, dcplan.dedup(plans, "torch"), "torch")
    table = compare_table({"torch default": torch_rep, "size_balanced": rep})
    assert "torch default" in table and "size_balanced" in table and f"{rep.ratio:.3f}" in table


def test_busiest_ties_go_to_the_lowest_rank() -> None:
    plans = _plans(3, {"a": (10, (1,)), "b": (10, (2,))})
    assert build_report(plans, plans).busiest_rank == 1


def test_table_elides_ranks_beyond_max_rows() -> None:
    wl = workloads.make("ddp", "tiny", 100)
    rep = build_report(wl.plans, dcplan.dedup(wl.plans, "size_balanced"))
    text = rep.table(max_rows=10)
    assert "(90 of 100 ranks not shown)" in text and len(text.splitlines()) < 30


def test_fast_nbytes_matches_item_nbytes() -> None:
    import torch

    items = [tensor_item("a", (3, 5), dtype=torch.bfloat16), tensor_item("b", (8, 4), (4, 0), (4, 4)),
             tensor_item("c", ()), tensor_item("d", (0, 2)), bytes_item("e", nbytes=77), bytes_item("f")]
    assert [fast_nbytes(i) for i in items] == [item_nbytes(i) for i in items]
    for block in (1, 2, 3, 4096):  # blocks with and without object items
        assert nbytes_list(items, block) == [item_nbytes(i) for i in items]
        assert nbytes_list(items[:4], block) == [item_nbytes(i) for i in items[:4]]
    assert fmt_bytes(1536) == "1.50 KiB" and fmt_bytes(12) == "12 B"


def test_save_planner_exposes_and_logs_the_report(caplog) -> None:
    wl = workloads.make("hsdp2", "tiny", 4)
    planner = dcplan.SavePlanner(strategy="size_balanced")
    with caplog.at_level(logging.INFO, logger="dcplan"):
        planner.plan_global([p for p in wl.plans])
    rep = planner.report
    assert rep.strategy == "size_balanced" and len(rep.bytes_per_rank) == 4
    assert rep == build_report(wl.plans, dcplan.dedup(wl.plans, "size_balanced"), "size_balanced")
    assert [r.message for r in caplog.records if "plan report" in r.message] == [rep.summary()]


def _index_state(idx) -> tuple:
    return ([(k.fqn, tuple(k.offset or ())) for k in idx.keys], [tuple(h) for h in idx.holders],
            [list(i) for i in idx.ids], [id(f) for f in idx.first], idx.nbytes)


def _with_copies(plans: list[SavePlan], copies: list[int]) -> list[SavePlan]:
    """``plans`` plus, for each ``r`` in ``copies``, a rank holding the same items as rank ``r`` (distinct objects)."""
    import copy

    return plans + [SavePlan(copy.deepcopy(plans[r].items)) for r in copies if r < len(plans)]


@settings(max_examples=80, deadline=None)
@given(layouts(max_world=4, max_tensors=5), __import__("hypothesis").strategies.lists(
    __import__("hypothesis").strategies.integers(0, 3), max_size=4))
def test_plan_digests_change_speed_not_results(plans: list[SavePlan], copies: list[int]) -> None:
    """Ranks with equal plan digests are indexed once; holders, ids, owners and plans stay the same."""
    from dcplan.save.index import PlanIndex
    from dcplan.save.local import plan_digest

    plans = _with_copies(plans, copies)
    digests = [plan_digest(p.items) for p in plans]
    plain = PlanIndex(plans)
    fast = PlanIndex(plans, digests)
    assert _index_state(fast) == _index_state(plain)
    pm = dcplan.get_plugin_manager()
    for name in ("size_balanced", "split", "lowest_rank"):
        want = dcplan.dedup(plans, name)
        strat = pm.get_strategy(name)
        # what SavePlanner.plan_global does: one index (with digests) handed to the strategy
        got = strat.run(plans, strat.resolve_options({}), index_plans(plans, digests))
        assert _snap(got) == _snap(want), name


def _snap(plans: list[SavePlan]) -> list:
    from _balance_plans import snapshot

    return snapshot(plans)


def test_plan_digest_sharing_on_replicated_layouts() -> None:
    """DDP: every rank shares rank 0's id list; HSDP: ranks r and r + shard share; results unchanged."""
    from dcplan.save.index import PlanIndex
    from dcplan.save.local import plan_digest

    for plans, period in ((workloads.ddp("tiny", 6, distinct=True), 1), (workloads.hsdp("tiny", 8, shard=4, distinct=True), 4)):
        digests = [plan_digest(p.items) for p in plans]
        fast = PlanIndex(plans, digests)
        assert [fast.ids[r] is fast.ids[r % period] for r in range(len(plans))] == [True] * len(plans)
        assert _index_state(fast) == _index_state(PlanIndex(plans))


def test_a_wrong_digest_match_is_caught_by_the_end_guard() -> None:
    """Equal digests with different first/last keys (a bug elsewhere) fall back to a full index."""
    from dcplan.save.index import PlanIndex

    plans = _plans(2, {"a": (10, (0,)), "b": (10, (1,)), "c": (10, (0, 1))})
    fast = PlanIndex(plans, [b"same", b"same"])
    assert _index_state(fast) == _index_state(PlanIndex(plans))
    assert fast.ids[0] is not fast.ids[1]


def test_index_handles_a_key_twice_in_one_plan() -> None:
    """A plan listing the same key twice (new to the index) still gets one id for it."""
    from dcplan.save.index import PlanIndex

    a, b = _t("a", 4), _t("b", 4)
    plans = [SavePlan([a, b, a]), SavePlan([b])]
    idx = PlanIndex(plans)
    assert [k.fqn for k in idx.keys] == ["a", "b"]
    assert idx.ids == [[0, 1, 0], [1]]
    assert idx.holders == [(0,), (0, 1)]
