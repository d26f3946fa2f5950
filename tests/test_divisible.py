"""The exact divisible bound (``dcplan.save.divisible``): max flow against subset enumeration."""

from __future__ import annotations

import itertools
import random

import pytest

from dcplan import workloads
from dcplan.save.divisible import divisible_flow, exact_divisible_bound, group_items
from dcplan.save.index import PlanIndex
from dcplan.save.report import divisible_lower_bound


def brute_bound(n: int, fixed: list[int], groups: dict[tuple[int, ...], int]) -> int:
    """max over rank subsets S of ceil((fixed(S) + bytes of holder sets inside S) / |S|) (min cut)."""
    best = max(fixed, default=0)
    for k in range(1, n + 1):
        for subset in itertools.combinations(range(n), k):
            inside = set(subset)
            total = sum(fixed[r] for r in subset) + sum(b for g, b in groups.items() if inside.issuperset(g))
            best = max(best, -(-total // k))
    return best


def _check_flow(fixed: list[int], groups: dict[tuple[int, ...], int]) -> int:
    res = divisible_flow(fixed, groups)
    assert res is not None
    loads = list(fixed)
    for g, q, b in zip(res.groups, res.quotas, res.group_bytes):
        assert sum(q.values()) == b and set(q) <= set(g) and all(v > 0 for v in q.values())
        for r, v in q.items():
            loads[r] += v
    assert max(loads, default=0) <= res.bound  # the quotas reach the bound
    return res.bound


def test_overlapping_groups_raise_the_bound_above_every_single_group() -> None:
    # {0,1} and {1,2} overlap without nesting; rank 2 is busy with its own items
    fixed = [0, 0, 90, 0]
    groups = {(0, 1): 100, (1, 2): 100}
    # per holder set: max(50, ceil(190 / 2)) = 95; the subset {0, 1, 2} needs ceil(290 / 3) = 97
    assert _check_flow(fixed, groups) == brute_bound(4, fixed, groups) == 97


@pytest.mark.parametrize("seed", range(6))
def test_matches_subset_enumeration_on_random_small_layouts(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(60):
        n = rng.randint(2, 10)
        fixed = [rng.choice([0, 0, rng.randint(0, 1000)]) for _ in range(n)]
        groups: dict[tuple[int, ...], int] = {}
        for _ in range(rng.randint(1, 7)):
            g = tuple(sorted(rng.sample(range(n), rng.randint(2, n))))
            groups[g] = groups.get(g, 0) + rng.randint(1, 3000)
        assert _check_flow(fixed, groups) == brute_bound(n, fixed, groups)


def test_matches_subset_enumeration_on_generated_layouts() -> None:
    for wl in workloads.random_layouts(40, seed=5, min_world=2, max_world=10):
        idx = PlanIndex(wl.plans)
        fixed, groups = group_items(idx.holders, idx.nbytes, idx.world_size)
        want = brute_bound(idx.world_size, fixed, groups)
        assert exact_divisible_bound(idx.world_size, idx.holders, idx.nbytes) == want, wl.name
        holders = dict(enumerate(idx.holders))
        assert divisible_lower_bound(idx.world_size, holders, dict(enumerate(idx.nbytes))) == want, wl.name


def test_past_the_edge_budget_there_is_no_flow() -> None:
    groups = {tuple(range(r, r + 3)): 10 for r in range(8)}
    assert divisible_flow([0] * 10, groups, edge_budget=10) is None
    assert divisible_flow([0] * 10, groups) is not None
