"""The exact divisible lower bound, and the per-(holder set, rank) quotas that reach it.

When items may be split anywhere, the busiest rank of the best assignment is the
smallest ``T`` such that all replicated bytes can be spread fractionally over
their holders with every rank's fixed load (items only it holds) plus its share
``<= T``. That is a max-flow feasibility question on a bipartite graph whose left
side is the *distinct holder sets* (items grouped by the exact set of ranks
holding them)::

    source --(bytes of holder set g)--> g --(inf)--> rank r in g --(T - fixed[r])--> sink

``T`` is feasible iff the max flow saturates every source edge. By max-flow /
min-cut that is equivalent to the closed formula::

    T* = max over rank subsets S of (fixed(S) + bytes of holder sets contained in S) / |S|

which the report's older bound only evaluated for ``S`` = each holder set (exact
for nested, "laminar" groups only: DDP, FSDP, HSDP, TP x PP x DP; not for
mixtures whose replica groups overlap without nesting, e.g. expert parallel next
to data parallel).

The search is Dinkelbach's parametric method: start from a valid bound ``T``;
compute a max flow; if it does not saturate, the ranks reachable from the source
in the residual graph are the subset ``S`` that violates ``T`` the most, and
``T <- ceil((fixed(S) + bytes inside S) / |S|)``. ``T`` only rises, each step
changes ``S``, and in practice two or three flows suffice (each warm-started from
the previous one). Capacities are integers, so at the integer ``T`` the flow is
integral: its per-(holder set, rank) values are byte *quotas* that a splitting
strategy (``split``) can follow.

Cost: the flow is augmenting paths on the holder-set/rank graph (edges = sum of
the distinct holder sets' sizes), after a greedy water-filling start that is
usually already optimal or nearly so. Past :data:`EDGE_BUDGET` edges (only
synthetic layouts with very many distinct, overlapping holder sets get there),
:func:`divisible_flow` returns ``None`` and callers fall back to the per-holder-set
bound (still valid, possibly lower than the exact one).
"""
from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import attrs

#: the largest holder-set/rank graph (sum of the distinct holder sets' sizes) the exact bound builds
EDGE_BUDGET = 250_000


@attrs.frozen
class DivisibleFlow:
    """The exact divisible bound and one integral flow that reaches it."""

    #: the bound: the smallest integer T at which every replicated byte fits
    bound: int
    #: the distinct holder sets (ascending rank tuples, each of 2+ ranks), in a deterministic order
    groups: tuple[tuple[int, ...], ...]
    #: bytes of each holder set
    group_bytes: tuple[int, ...]
    #: per holder set, ``rank -> bytes`` that rank writes of it (sums to the set's bytes)
    quotas: tuple[dict[int, int], ...]
    #: the rank subset whose average set the bound (empty when a single rank's fixed load did)
    tight: tuple[int, ...]


def group_items(
    holders: Sequence[Sequence[int]], sizes: Sequence[int], world_size: int
) -> tuple[list[int], dict[tuple[int, ...], int]]:
    """Per rank its fixed load, and per distinct holder set (2+ ranks) its bytes."""
    fixed = [0] * world_size
    group_bytes: dict[tuple[int, ...], int] = {}
    get = group_bytes.get
    for hs, p in zip(holders, sizes):
        if len(hs) == 1:
            fixed[hs[0]] += p
        else:
            hk = tuple(hs)
            group_bytes[hk] = get(hk, 0) + p
    return fixed, group_bytes


def divisible_flow(
    fixed: Sequence[int],
    group_bytes: dict[tuple[int, ...], int],
    start: int = 0,
    edge_budget: int = EDGE_BUDGET,
) -> DivisibleFlow | None:
    """The exact divisible bound of ``fixed`` loads plus ``group_bytes`` (see the module doc).

    :param fixed: per rank, bytes it must write itself.
    :param group_bytes: distinct holder set (ascending ranks) -> bytes, spreadable over its ranks.
    :param start: a known lower bound to start the search from (e.g. the per-holder-set bound).
    :returns: ``None`` when the graph has more than ``edge_budget`` edges.
    """
    groups = sorted(group_bytes, key=lambda g: (len(g), g))
    if sum(len(g) for g in groups) > edge_budget:
        return None
    gb = [group_bytes[g] for g in groups]
    n = len(fixed)
    t = max(start, max(fixed, default=0))
    tight: tuple[int, ...] = ()
    flows: list[dict[int, int]] = [{} for _ in groups]
    of_rank: list[list[int]] = [[] for _ in range(n)]
    for gi, g in enumerate(groups):
        for r in g:
            of_rank[r].append(gi)
    load = list(fixed)  # fixed + flow into the rank
    excess = list(gb)  # bytes of each holder set not yet placed
    _greedy(groups, flows, load, excess, t)
    while True:
        reach = _max_flow(groups, of_rank, flows, load, excess, t)
        if reach is None:
            break
        # not feasible: ``reach`` (the source side's ranks) violates t the most
        inside = set(reach)
        total = sum(fixed[r] for r in reach)
        total += sum(b for g, b in zip(groups, gb) if inside.issuperset(g))
        new_t = -(-total // len(reach))
        assert new_t > t, "the parametric search must make progress"
        t, tight = new_t, tuple(sorted(reach))
    return DivisibleFlow(
        bound=t, groups=tuple(groups), group_bytes=tuple(gb), quotas=tuple(flows), tight=tight
    )


def _greedy(
    groups: Sequence[tuple[int, ...]], flows: list[dict[int, int]], load: list[int], excess: list[int], t: int
) -> None:
    """Water-fill each holder set (fewest ranks first) into its ranks' room below ``t``."""
    for gi, g in enumerate(groups):
        room = sorted((load[r], r) for r in g if load[r] < t)
        if not room:
            continue
        p = excess[gi]
        # the level this set's bytes would reach over the ranks it can use
        acc = 0
        level = t
        for i, (lo, _) in enumerate(room):
            acc += lo
            cand = -(-(p + acc) // (i + 1))
            if i + 1 == len(room) or cand <= room[i + 1][0]:
                level = min(t, cand)
                break
        fl = flows[gi]
        for lo, r in room:
            if p <= 0 or lo >= level:
                break
            give = min(level - lo, p)
            fl[r] = fl.get(r, 0) + give
            load[r] += give
            p -= give
        excess[gi] = p


def _max_flow(
    groups: Sequence[tuple[int, ...]],
    of_rank: Sequence[Sequence[int]],
    flows: list[dict[int, int]],
    load: list[int],
    excess: list[int],
    t: int,
) -> list[int] | None:
    """Augment until every holder set is placed (``None``) or no path is left (the reachable ranks)."""
    while True:
        roots = [gi for gi, e in enumerate(excess) if e > 0]
        if not roots:
            return None
        # BFS from every holder set with bytes left over: set -> its ranks (forward, unbounded),
        # rank -> a set with flow into it (backward); a rank with room below t ends a path.
        parent_g: dict[int, int] = {gi: -1 for gi in roots}  # set -> the rank it was reached from
        parent_r: dict[int, int] = {}  # rank -> the set it was reached from
        ends: list[int] = []
        queue = deque(roots)
        while queue:
            gi = queue.popleft()
            for r in groups[gi]:
                if r in parent_r:
                    continue
                parent_r[r] = gi
                if load[r] < t:
                    ends.append(r)
                for gj in of_rank[r]:
                    if gj not in parent_g and flows[gj].get(r, 0) > 0:
                        parent_g[gj] = r
                        queue.append(gj)
        if not ends:
            return sorted(parent_r)
        progressed = False
        for end in ends:
            # walk back to the root, the bottleneck on current values (paths share nodes)
            room = t - load[end]
            path: list[tuple[int, int]] = []  # (set, rank) forward edges
            r = end
            while True:
                gi = parent_r[r]
                path.append((gi, r))
                back = parent_g[gi]
                if back < 0:
                    break
                room = min(room, flows[gi].get(back, 0))
                r = back
            room = min(room, excess[path[-1][0]])
            if room <= 0:
                continue
            progressed = True
            excess[path[-1][0]] -= room
            load[end] += room
            for i, (gi, r) in enumerate(path):
                fl = flows[gi]
                fl[r] = fl.get(r, 0) + room
                if i + 1 < len(path):  # the set gave up the same amount on the rank it was reached from
                    back = path[i + 1][1]
                    left = fl[back] - room
                    if left:
                        fl[back] = left
                    else:
                        del fl[back]
        assert progressed


def exact_divisible_bound(world_size: int, holders: Sequence[Sequence[int]], sizes: Sequence[int]) -> int | None:
    """The exact divisible bound of a layout (``None`` past the edge budget)."""
    fixed, group_bytes = group_items(holders, sizes, world_size)
    res = divisible_flow(fixed, group_bytes)
    return None if res is None else res.bound
