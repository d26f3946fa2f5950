"""dcplan-size-balanced: give each replicated item to one holder, keeping the busiest rank light.

Modes (config ``strategy_options = {mode = "...", balance = "..."}``):

* ``"balanced"`` (default): weights are the bytes each item actually writes
  (chunk numel x element size, :func:`dcplan.save.local.item_nbytes`). A
  portfolio of greedy assignments (torch's greedy replayed exactly, plain LPT,
  LPT with fixed loads first, fewest-holders-first, a best fit under the lower
  bound) is scored by the busiest rank; the best is improved by moves and
  swaps off the busiest rank (:mod:`dcplan_size_balanced.solver`). It is never
  worse than torch's greedy or plain LPT, by construction.
* ``"torch"``: the same owners as torch's ``dedup_save_plans`` on the same
  plans (items in first-seen order, weight = the *global* tensor bytes or 1,
  unique items counted only when reached) except that ties go to the lowest
  rank, where torch's follow Python set order.

``balance = "node"`` (with ``mode = "balanced"``): nodes first (ranks sharing
a host, from the plan index's ``hosts``), then ranks within each node.

All are deterministic (no set or hash order decides anything, no wall-clock
budget) and never mutate their input. Cost: one dict lookup per plan entry
plus, per portfolio entry, a heap operation per item; the local search is
bounded by 4 x (ranks + replicated items) steps.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Any

import dcplan
from dcplan.compat import SavePlan, WriteItem
from dcplan.gcpause import paused_gc
from dcplan.save.bound import _bound
from dcplan.save.index import PlanIndex, index_plans
from dcplan.save.report import node_of_ranks
from dcplan_size_balanced.solver import Solution, greedy, solve

__all__ = ["balanced", "torch_parity", "size_balanced", "MODES"]

MODES = ("balanced", "torch")
BALANCES = ("rank", "node")


def _torch_weight(item: WriteItem) -> int:
    """torch's weight: ``tensor_storage_size() or 1`` (global tensor bytes)."""
    td = item.tensor_data
    if td is None:
        return 1
    n = 1
    for s in td.size:
        n *= s
    return n * td.properties.dtype.itemsize or 1


def torch_weights(items: Sequence[WriteItem]) -> list[int]:
    """:func:`_torch_weight` of every item, with C-level maps for tensor items."""
    try:
        sizes = list(map(_TD_SIZE, items))
        dtypes = list(map(_TD_DTYPE, items))
    except AttributeError:  # an object item somewhere
        return [_torch_weight(i) for i in items]
    isz = {d: int(d.itemsize) for d in set(dtypes)}
    return [(math.prod(s) * isz[d]) or 1 for s, d in zip(sizes, dtypes)]


_TD_SIZE = operator.attrgetter("tensor_data.size")
_TD_DTYPE = operator.attrgetter("tensor_data.properties.dtype")


def balanced_owners(idx: PlanIndex) -> list[int]:
    """The owner rank of each key of ``idx`` under the ``balanced`` rule (portfolio + local search)."""
    return balanced_solution(idx).owner


def balanced_solution(idx: PlanIndex) -> Solution:
    """The full :class:`~dcplan_size_balanced.solver.Solution` of the ``balanced`` mode on ``idx``."""
    lb = idx.lower_bound()[0]
    return solve(
        idx.world_size, idx.holders, idx.nbytes, lower_bound=lb, torch_weights=lambda: torch_weights(idx.first)
    )


def node_owners(idx: PlanIndex, hosts: Sequence[str | None] | None) -> list[int]:
    """``balance = "node"``: nodes first (ranks sharing a host), then ranks within each node.

    Nodes are numbered by first appearance in rank order; a rank whose host is
    unknown (``None``) is a node of its own. Step 1 assigns every item to a
    node holding it (the same portfolio + local search, on nodes); step 2
    assigns it to one of its holders on that node. The ``balance = "rank"``
    plan replaces the result when it is better on nodes (then on ranks).
    """
    node_of = node_ids(idx.world_size, hosts)
    nodes = max(node_of, default=-1) + 1
    if nodes == idx.world_size:  # one rank per node (or hosts unknown): plain rank balance
        return balanced_owners(idx)
    nb = idx.nbytes
    node_holders = [tuple(sorted({node_of[r] for r in hs})) for hs in idx.holders]
    lb = _bound(nodes, node_holders, nb)[0]
    step1 = solve(nodes, node_holders, nb, lower_bound=lb).owner
    within = [tuple(r for r in hs if node_of[r] == n) for hs, n in zip(idx.holders, step1)]
    lb = _bound(idx.world_size, within, nb)[0]
    by_node = solve(idx.world_size, within, nb, lower_bound=lb)
    # the rank-balanced plan is a candidate too: node mode is never worse than it on nodes
    by_rank = balanced_solution(idx)

    def score(sol: Solution) -> tuple[int, int]:
        per_node = [0] * nodes
        for r, b in enumerate(sol.loads):
            per_node[node_of[r]] += b
        return max(per_node), sol.busiest

    return by_node.owner if score(by_node) <= score(by_rank) else by_rank.owner


def node_ids(world: int, hosts: Sequence[str | None] | None) -> list[int]:
    """Per rank, its node number (see :func:`dcplan.save.report.node_of_ranks`)."""
    return node_of_ranks(world, hosts if hosts is not None else [])[0]


def balanced(
    all_plans: Sequence[SavePlan], *, index: PlanIndex | None = None, balance: str = "rank"
) -> list[SavePlan]:
    """Best of torch's greedy, LPT and fewest-holders-first, improved by local search (see the module doc)."""
    idx = index if index is not None else index_plans(all_plans)
    if balance == "node":
        owner = node_owners(idx, getattr(idx, "hosts", None))
    else:
        owner = balanced_owners(idx)
    return idx.apply_owners(all_plans, owner)


def torch_parity(all_plans: Sequence[SavePlan], *, index: PlanIndex | None = None) -> list[SavePlan]:
    """torch's greedy: items in first-seen order, weight = global tensor bytes, ties to the lowest rank."""
    idx = index if index is not None else index_plans(all_plans)
    # torch weighs the last holder's copy; every holder's copy has the same global size and
    # dtype in a valid plan (build_global_plan rejects the others), so the first one is used.
    weight = torch_weights(idx.first)
    owner = [0] * len(idx)
    greedy(idx.world_size, idx.holders, range(len(idx)), weight, [0] * idx.world_size, owner)
    return idx.apply_owners(all_plans, owner)


def check_options(options: dict[str, Any]) -> None:
    """Reject unknown ``mode`` / ``balance`` values (runs on every rank when a planner is built)."""
    mode = options.get("mode", "balanced")
    if mode not in MODES:
        raise ValueError(
            f"size_balanced: unknown mode {mode!r}; choose one of: {', '.join(MODES)} "
            '(e.g. strategy_options = {mode = "balanced"})'
        )
    bal = options.get("balance", "rank")
    if bal not in BALANCES:
        raise ValueError(
            f"size_balanced: unknown balance {bal!r}; choose one of: {', '.join(BALANCES)} "
            '(e.g. strategy_options = {balance = "node"})'
        )
    if bal == "node" and mode != "balanced":
        raise ValueError('size_balanced: balance = "node" needs mode = "balanced"')


def size_balanced(
    all_plans: Sequence[SavePlan], mode: str = "balanced", balance: str = "rank", *, index: PlanIndex | None = None
) -> list[SavePlan]:
    """The ``size_balanced`` strategy; ``mode`` is ``"balanced"`` (default) or ``"torch"``.

    :param balance: ``"rank"`` (default) or ``"node"`` (nodes first, then ranks; hosts from the index).
    :param index: a :class:`PlanIndex` of ``all_plans`` (built here when ``None``).
    """
    check_options({"mode": mode, "balance": balance})
    with paused_gc():
        if mode == "balanced":
            return balanced(all_plans, index=index, balance=balance)
        return torch_parity(all_plans, index=index)


@dcplan.hookimpl
def dcplan_register_strategies() -> list[dcplan.Strategy]:
    return [
        dcplan.Strategy(
            name="size_balanced",
            func=size_balanced,
            description=(
                "replicated items go to the least-loaded holder, by bytes written, fewest holders and "
                "largest first (mode: balanced | torch = torch's greedy with lowest-rank ties)"
            ),
            options={"mode": "balanced", "balance": "rank"},
            check_options=check_options,
        )
    ]
