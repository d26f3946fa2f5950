"""The plan report: who writes what, and how far the busiest rank is from ideal.

The busiest rank sets the pace of a save, so the report compares its bytes with
a lower bound on what *any* assignment of whole items could achieve. The bound
is the divisible relaxation of restricted assignment
(``/work/shared/reference/peers.md`` section 5)::

    LB = max( max_j p_j,  max_i L_i,  max_j (p_j + min_{i in M_j} L_i),
              max_K [sum_{i in K} L_i + sum_{j: M_j subset of K} p_j] / |K| )

where ``L_i`` is rank i's fixed load (bytes of the items only it holds), ``p_j``
a replicated item's bytes and ``M_j`` its holders. ``K`` ranges over every
distinct holder set (the replica groups), which is exact for the disjoint and
laminar layouts that DDP, FSDP, HSDP and TP x PP x DP produce; for groups that
overlap without nesting, the max over *every* rank subset is computed by max flow
(:mod:`dcplan.save.divisible`, within an edge budget) and the bound rises to it. Bytes are the
bytes actually written (chunk numel x element size, see
:func:`dcplan.save.local.item_nbytes`). A strategy that *splits* items (``split``)
may beat this bound: its ratio can be below 1.

Everything here is linear in the number of plan entries (one dict lookup per
entry), so a report on 2M items costs about as much as one dedup pass.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from dcplan.compat import SavePlan
from dcplan.fmt import fmt_bytes
from dcplan.save.bound import _bound  # (also re-exported: plugins and tests import it from here)
from dcplan.save.index import PlanIndex, index_plans, nbytes_list

log = logging.getLogger("dcplan")


def lower_bound(world_size: int, holders: Mapping[Any, Sequence[int]], sizes: Mapping[Any, int]) -> int:
    """The lower bound on the busiest rank's bytes for any whole-item assignment.

    :param world_size: number of ranks.
    :param holders: item key -> ranks holding it.
    :param sizes: item key -> bytes.
    """
    keys = list(holders)
    return _bound(world_size, [holders[k] for k in keys], [sizes[k] for k in keys])[0]


def divisible_lower_bound(world_size: int, holders: Mapping[Any, Sequence[int]], sizes: Mapping[Any, int]) -> int:
    """The lower bound when items may be split anywhere (fixed loads and replica-group averages only)."""
    keys = list(holders)
    return _bound(world_size, [holders[k] for k in keys], [sizes[k] for k in keys])[2]


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
    bound_reason: str = ""
    #: the bound when items may be split (``split`` can go below ``lower_bound``, never below this)
    divisible_bound: int = 0
    #: nodes (ranks sharing a host), in order of their first rank; empty when hosts are unknown
    node_names: tuple[str, ...] = ()
    bytes_per_node: tuple[int, ...] = ()
    busiest_node: int = -1
    busiest_node_bytes: int = 0
    #: the whole-item lower bound on the busiest node's bytes (same formula, nodes as machines)
    node_lower_bound: int = 0

    @property
    def node_ratio(self) -> float:
        """Busiest node / its lower bound (1.0 when hosts are unknown)."""
        return self.busiest_node_bytes / self.node_lower_bound if self.node_lower_bound else 1.0

    @property
    def divisible_ratio(self) -> float:
        """Busiest rank / divisible bound: how close a splitting strategy is to perfect."""
        return self.busiest_bytes / self.divisible_bound if self.divisible_bound else 1.0

    @property
    def world_size(self) -> int:
        return len(self.bytes_per_rank)

    @property
    def total_items(self) -> int:
        return sum(self.items_per_rank)

    def table(self, max_rows: int = 32) -> str:
        """Per-rank bytes and items; with more than ``max_rows`` ranks, the busiest and idlest."""
        lines = [f"{'rank':>6} {'bytes':>18} {'':>11} {'items':>8}"]
        n = self.world_size
        if n <= max_rows:
            shown = list(range(n))
        else:
            by_load = sorted(range(n), key=lambda r: (-self.bytes_per_rank[r], r))
            half = max_rows // 2
            shown = sorted(set(by_load[:half]) | set(by_load[-half:]))
        prev = -1
        for r in shown:
            if prev >= 0 and r != prev + 1:
                lines.append(f"{'...':>6}")
            prev = r
            b, k = self.bytes_per_rank[r], self.items_per_rank[r]
            mark = "  <- busiest" if r == self.busiest_rank else ""
            lines.append(f"{r:>6} {b:>18,} {fmt_bytes(b):>11} {k:>8}{mark}")
        if n > max_rows:
            lines.append(f"({n - len(shown)} of {n} ranks not shown)")
        lines.append(
            f"busiest rank {self.busiest_rank}: {fmt_bytes(self.busiest_bytes)}; lower bound "
            f"{fmt_bytes(self.lower_bound)} ({self.bound_reason or 'n/a'}); ratio {self.ratio:.3f}"
        )
        if self.node_names:
            lines.append(self.node_table(max_rows))
        return "\n".join(lines)

    def node_table(self, max_rows: int = 32) -> str:
        """Bytes per node (ranks sharing a host) and the busiest node against its bound."""
        lines = [f"{'node':>16} {'bytes':>18} {'':>11}"]
        order = sorted(range(len(self.node_names)), key=lambda n: (-self.bytes_per_node[n], n))[:max_rows]
        for n in sorted(order):
            b = self.bytes_per_node[n]
            mark = "  <- busiest" if n == self.busiest_node else ""
            lines.append(f"{self.node_names[n][:16]:>16} {b:>18,} {fmt_bytes(b):>11}{mark}")
        if len(order) < len(self.node_names):
            lines.append(f"({len(self.node_names) - len(order)} of {len(self.node_names)} nodes not shown)")
        lines.append(
            f"busiest node {self.node_names[self.busiest_node]}: {fmt_bytes(self.busiest_node_bytes)}; "
            f"node lower bound {fmt_bytes(self.node_lower_bound)}; ratio {self.node_ratio:.3f}"
        )
        return "\n".join(lines)

    def summary(self) -> str:
        return (
            f"dcplan plan report ({self.strategy or 'strategy'}): {self.world_size} ranks, "
            f"{self.total_items} items, {fmt_bytes(self.total_bytes)} total; busiest rank {self.busiest_rank} "
            f"writes {fmt_bytes(self.busiest_bytes)}, lower bound {fmt_bytes(self.lower_bound)}, "
            f"ratio {self.ratio:.3f}"
        )

    def to_dict(self) -> dict[str, Any]:
        d = attrs.asdict(self)
        d["bytes_per_rank"] = list(self.bytes_per_rank)
        d["items_per_rank"] = list(self.items_per_rank)
        d["node_names"] = list(self.node_names)
        d["bytes_per_node"] = list(self.bytes_per_node)
        return d


def build_report(
    local_plans: Sequence[SavePlan],
    global_plan: Sequence[SavePlan],
    strategy: str = "",
    *,
    index: PlanIndex | None = None,
    hosts: Sequence[str | None] | None = None,
) -> PlanReport:
    """Report on ``global_plan`` (after dedup) given the ``local_plans`` it came from.

    :param local_plans: one plan per rank before dedup (who *holds* what).
    :param global_plan: one plan per rank after dedup (who *writes* what).
    :param strategy: a name shown in the report.
    :param index: a :class:`PlanIndex` of ``local_plans`` already built (saves a pass).
    :param hosts: per rank, its host name (default: the index's ``hosts``); with
        hosts, the report adds bytes per node and the busiest node's bound.
    """
    world = len(global_plan)
    per_rank = [sum(nbytes_list(p.items)) for p in global_plan]
    items = [len(p.items) for p in global_plan]
    idx = index if index is not None else index_plans(local_plans)
    if world <= idx.world_size:  # (the bound of the index's own world: computed once per index)
        lb, why, div = idx.lower_bound()
    else:
        lb, why, div = _bound(max(world, idx.world_size), idx.holders, idx.nbytes)
    busiest = min(range(world), key=lambda r: (-per_rank[r], r)) if world else 0
    top = per_rank[busiest] if world else 0
    ratio = (top / lb) if lb else 1.0
    if hosts is None:
        hosts = getattr(idx, "hosts", None)
    nodes = _node_fields(per_rank, idx, hosts) if hosts is not None and any(h is not None for h in hosts) else {}
    return PlanReport(
        bytes_per_rank=tuple(per_rank),
        items_per_rank=tuple(items),
        busiest_rank=busiest,
        busiest_bytes=top,
        lower_bound=lb,
        ratio=ratio,
        strategy=strategy,
        total_bytes=sum(per_rank),
        bound_reason=why,
        divisible_bound=div,
        **nodes,
    )


def node_of_ranks(world: int, hosts: Sequence[str | None]) -> tuple[list[int], list[str]]:
    """Per rank its node number, and the node names: equal hosts share a node (first-appearance order);
    a rank without a host is a node of its own, named ``rank<r>``."""
    node_of: list[int] = []
    names: list[str] = []
    seen: dict[str, int] = {}
    for r in range(world):
        h = hosts[r] if r < len(hosts) else None
        if h is None:
            node_of.append(len(names))
            names.append(f"rank{r}")
            continue
        n = seen.get(h)
        if n is None:
            n = seen[h] = len(names)
            names.append(h)
        node_of.append(n)
    return node_of, names


def _node_fields(per_rank: Sequence[int], idx: PlanIndex, hosts: Sequence[str | None]) -> dict[str, Any]:
    node_of, names = node_of_ranks(len(per_rank), hosts)
    per_node = [0] * len(names)
    for r, b in enumerate(per_rank):
        per_node[node_of[r]] += b
    node_holders = [tuple(sorted({node_of[r] for r in hs})) for hs in idx.holders]
    nlb = _bound(len(names), node_holders, idx.nbytes)[0]
    busiest = min(range(len(names)), key=lambda n: (-per_node[n], n))
    return {
        "node_names": tuple(names),
        "bytes_per_node": tuple(per_node),
        "busiest_node": busiest,
        "busiest_node_bytes": per_node[busiest],
        "node_lower_bound": nlb,
    }


def compare_table(reports: Mapping[str, PlanReport]) -> str:
    """Side-by-side summary of several reports on the same local plans (one row each).

    Columns: strategy, busiest rank and its bytes, the lower bound, the ratio
    (busiest / lower bound), the least-loaded rank's bytes, and the largest
    number of items (files' entries) one rank writes.
    """
    header = (
        f"{'strategy':<28} {'busiest':>8} {'busiest bytes':>13} {'lower bound':>13} {'ratio':>7} "
        f"{'idlest bytes':>13} {'max items':>9} {'total items':>11}"
    )
    lines = [header, "-" * len(header)]
    for name, r in reports.items():
        idle = min(r.bytes_per_rank) if r.bytes_per_rank else 0
        lines.append(
            f"{name:<28} {r.busiest_rank:>8} {fmt_bytes(r.busiest_bytes):>13} {fmt_bytes(r.lower_bound):>13} "
            f"{r.ratio:>7.3f} {fmt_bytes(idle):>13} {max(r.items_per_rank, default=0):>9} {r.total_items:>11}"
        )
    return "\n".join(lines)
