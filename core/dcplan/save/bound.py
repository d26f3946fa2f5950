"""The lower bound on the busiest rank's bytes of any whole-item assignment (and the divisible one).

Used by the plan report (:mod:`dcplan.save.report`), by :meth:`dcplan.save.index.PlanIndex.lower_bound`
and by strategies that stop at the bound. It depends only on who holds what and the item sizes.
"""

from __future__ import annotations

from collections.abc import Sequence

from dcplan.save.divisible import divisible_flow

__all__ = ["_bound"]


#: element comparisons the bound spends on subset tests between replica groups
_SUBSET_BUDGET = 4_000_000


def _bound(world_size: int, holders: Sequence[Sequence[int]], sizes: Sequence[int]) -> tuple[int, str, int]:
    """The whole-item lower bound, which term set it, and the divisible bound (no per-item terms)."""
    fixed = [0] * world_size
    group_bytes: dict[tuple[int, ...], int] = {}
    group_max: dict[tuple[int, ...], int] = {}
    biggest = 0
    # sums per holder-set object first (the index shares one tuple per set; hashing a tuple costs its
    # length): a lookup local to this call, by the objects of ``holders``, alive throughout
    obj_bytes: dict[int, int] = {}
    obj_max: dict[int, int] = {}
    obj_set: dict[int, Sequence[int]] = {}
    for hs, p in zip(holders, sizes):
        if p > biggest:
            biggest = p
        if len(hs) == 1:
            fixed[hs[0]] += p
        else:
            o = id(hs)
            had = obj_bytes.get(o)
            if had is None:
                obj_set[o] = hs
                obj_bytes[o] = p
                obj_max[o] = p
            else:
                obj_bytes[o] = had + p
                if p > obj_max[o]:
                    obj_max[o] = p
    for o, hs in obj_set.items():
        hk = tuple(hs)
        group_bytes[hk] = group_bytes.get(hk, 0) + obj_bytes[o]
        if obj_max[o] > group_max.get(hk, -1):
            group_max[hk] = obj_max[o]
    lb, why = 0, "empty plan"
    for r, f in enumerate(fixed):
        if f > lb:
            lb, why = f, f"fixed load of rank {r}"
    div = lb
    if biggest > lb:
        lb, why = biggest, "largest item"
    for g, p in group_max.items():
        t = p + min(fixed[i] for i in g)
        if t > lb:
            lb, why = t, "an item plus its holders' least fixed load"
    # K = each distinct holder set; items whose holders lie inside K must land in K.
    groups = sorted(group_bytes)
    containing: dict[int, list[int]] = {}
    for gi, g in enumerate(groups):
        for r in g:
            containing.setdefault(r, []).append(gi)
    sets = [frozenset(g) for g in groups]
    inside = [0] * len(groups)
    # Subset tests cost up to |g| each; many distinct overlapping groups (not a real layout) would make
    # this quadratic, so past a budget only equal holder sets count: a weaker bound, still valid.
    budget = _SUBSET_BUDGET
    for gi, g in enumerate(groups):
        b = group_bytes[g]
        inside[gi] += b
        if budget <= 0:
            continue
        s = sets[gi]
        for ki in containing[g[0]]:
            if ki != gi and len(groups[ki]) > len(g):
                budget -= len(g)
                if s <= sets[ki]:
                    inside[ki] += b
    for gi, g in enumerate(groups):
        total = sum(fixed[i] for i in g) + inside[gi]
        t = -(-total // len(g))
        div = max(div, t)
        if t > lb:
            lb, why = t, f"replica group of {len(g)} ranks ({g[0]}..{g[-1]})"
    # The exact divisible bound (max over *every* rank subset, by max flow); the per-holder-set
    # terms above are exact only for nested groups. Past the edge budget, keep them.
    flow = divisible_flow(fixed, group_bytes, start=div)
    if flow is not None and flow.bound > div:
        div = flow.bound
        if div > lb:
            tight = flow.tight
            lb, why = div, f"divisible bound over {len(tight)} ranks ({tight[0]}..{tight[-1]})"
    return lb, why, div
