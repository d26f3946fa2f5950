"""The plan report: who writes what, and how far the busiest rank is from ideal.

The lower bound follows the divisible relaxation of restricted assignment
(``../shared/reference/peers.md`` section 5):

    LB = max( max_i L_i,  max_j p_j (+ min fixed load of its holders),
              max_K [sum_{i in K} L_i + sum_{j: M_j subset of K} p_j] / |K| )

where ``L_i`` is rank i's fixed load (items only it holds), ``p_j`` a replicated
item's bytes and ``M_j`` its holders. ``K`` ranges over every distinct holder
set (the replica groups), which is exact for disjoint and laminar layouts.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import attrs

from dcplan.compat import SavePlan
from dcplan.planning import item_key, item_nbytes

__all__ = ["PlanReport", "build_report", "lower_bound", "holders_and_sizes"]

log = logging.getLogger("dcplan")


@attrs.frozen
class PlanReport:
    """Bytes and items per rank after dedup, with the balance against the lower bound."""

    bytes_per_rank: tuple[int, ...]
    items_per_rank: tuple[int, ...]
    busiest_rank: int
    busiest_bytes: int
    lower_bound: int
    ratio: float
    strategy: str = ""
    total_bytes: int = 0

    def table(self) -> str:
        lines = [f"{'rank':>5} {'bytes':>14} {'items':>7}"]
        for r, (b, n) in enumerate(zip(self.bytes_per_rank, self.items_per_rank)):
            mark = "  <- busiest" if r == self.busiest_rank else ""
            lines.append(f"{r:>5} {b:>14,} {n:>7}{mark}")
        lines.append(
            f"busiest rank {self.busiest_rank}: {self.busiest_bytes:,} B; lower bound "
            f"{self.lower_bound:,} B; ratio {self.ratio:.3f}"
        )
        return "\n".join(lines)

    def summary(self) -> str:
        return (
            f"dcplan plan report ({self.strategy or 'strategy'}): {len(self.bytes_per_rank)} ranks, "
            f"{self.total_bytes:,} B total, busiest rank {self.busiest_rank} writes "
            f"{self.busiest_bytes:,} B, lower bound {self.lower_bound:,} B, ratio {self.ratio:.3f}"
        )

    def to_dict(self) -> dict[str, Any]:
        d = attrs.asdict(self)
        d["bytes_per_rank"] = list(self.bytes_per_rank)
        d["items_per_rank"] = list(self.items_per_rank)
        return d


def holders_and_sizes(
    all_plans: Sequence[SavePlan],
) -> tuple[dict[Any, tuple[int, ...]], dict[Any, int]]:
    """For each item key: the ranks holding it (sorted) and its bytes."""
    holders: dict[Any, list[int]] = {}
    sizes: dict[Any, int] = {}
    for rank, plan in enumerate(all_plans):
        for item in plan.items:
            k = item_key(item)
            holders.setdefault(k, []).append(rank)
            if k not in sizes:
                sizes[k] = item_nbytes(item)
    return {k: tuple(sorted(set(v))) for k, v in holders.items()}, sizes


def lower_bound(
    world_size: int, holders: dict[Any, tuple[int, ...]], sizes: dict[Any, int]
) -> int:
    fixed = [0] * world_size
    group_bytes: dict[tuple[int, ...], int] = {}
    biggest = 0
    for k, hs in holders.items():
        p = sizes[k]
        if len(hs) == 1:
            fixed[hs[0]] += p
        else:
            group_bytes[hs] = group_bytes.get(hs, 0) + p
        biggest = max(biggest, p)
    lb = max(fixed, default=0)
    for k, hs in holders.items():
        if len(hs) > 1:
            lb = max(lb, sizes[k] + min(fixed[i] for i in hs))
    # K = every distinct holder set; items whose holders lie inside K must land in K.
    groups = list(group_bytes)
    sets = [frozenset(g) for g in groups]
    for g, s in zip(groups, sets):
        inside = sum(b for g2, s2, b in zip(groups, sets, group_bytes.values()) if s2 <= s)
        total = sum(fixed[i] for i in g) + inside
        lb = max(lb, -(-total // len(g)))
    return max(lb, biggest if not group_bytes else lb)


def build_report(
    local_plans: Sequence[SavePlan], global_plan: Sequence[SavePlan], strategy: str = ""
) -> PlanReport:
    """Report on ``global_plan`` (after dedup) given the ``local_plans`` it came from."""
    world = len(global_plan)
    per_rank = [sum(item_nbytes(i) for i in p.items) for p in global_plan]
    items = [len(p.items) for p in global_plan]
    holders, sizes = holders_and_sizes(local_plans)
    lb = lower_bound(world, holders, sizes)
    busiest = max(range(world), key=lambda r: (per_rank[r], -r)) if world else 0
    top = per_rank[busiest] if world else 0
    ratio = (top / lb) if lb else 1.0
    return PlanReport(
        bytes_per_rank=tuple(per_rank),
        items_per_rank=tuple(items),
        busiest_rank=busiest,
        busiest_bytes=top,
        lower_bound=lb,
        ratio=ratio,
        strategy=strategy,
        total_bytes=sum(per_rank),
    )
