"""dcplan-node-local: write each replicated item on the node of its replica group's coordinator.

Every item (a tensor, a shard, an object) is held by a set of ranks, its
*replica group*; the group's coordinator is its lowest rank. This strategy
gives the item to a holder on the **same node** as that coordinator, the
least-loaded one (ties: lowest rank). Use it when each node writes to its own
node-local storage that is later gathered per group, or to keep a group's
files together.

A strategy only sees plans, so it must be told where ranks live. The node of
rank ``r`` is, in order of precedence:

* ``nodes[r]`` when the ``nodes`` option lists a node id per rank;
* ``r // ranks_per_node`` when the ``ranks_per_node`` option is set;
* ``r // LOCAL_WORLD_SIZE`` read from the environment of the coordinator
  (torchrun sets it, and numbers ranks node by node);
* otherwise every rank is on one node.

Options are set through config, e.g. ``DCPLAN_STRATEGY=node_local`` and
``DCPLAN_STRATEGY_OPTIONS=ranks_per_node=8``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import dcplan
from dcplan.compat import replace_plan
from dcplan.save.local import item_key, item_nbytes

__all__ = ["node_local", "node_ids", "dcplan_register_strategies"]
__version__ = "0.1.0"


def node_ids(world_size: int, ranks_per_node: int = 0, nodes: Sequence[int] | None = None) -> list[int]:
    """The node id of every rank (see the module docstring for the rules).

    :raises ValueError: on a ``nodes`` list of the wrong length or a negative ``ranks_per_node``.
    """
    if nodes is not None:
        ids = list(nodes)
        if len(ids) != world_size or not all(isinstance(n, int) and not isinstance(n, bool) for n in ids):
            raise ValueError(
                f"node_local: the nodes option must list one integer node id per rank ({world_size} ranks), "
                f"got {nodes!r}; fix strategy_options.nodes or use ranks_per_node instead"
            )
        return ids
    if isinstance(ranks_per_node, bool) or not isinstance(ranks_per_node, int) or ranks_per_node < 0:
        raise ValueError(
            f"node_local: ranks_per_node must be an integer >= 0 (0: read LOCAL_WORLD_SIZE), got {ranks_per_node!r}"
        )
    per_node = ranks_per_node
    if per_node == 0:
        raw = os.environ.get("LOCAL_WORLD_SIZE", "")
        per_node = int(raw) if raw.strip().isdigit() and int(raw) > 0 else max(world_size, 1)
    return [r // per_node for r in range(world_size)]


def node_local(
    all_plans: Sequence[Any], ranks_per_node: int = 0, nodes: Sequence[int] | None = None
) -> list[Any]:
    """Give each item to the least-loaded holder on its replica group coordinator's node.

    :param all_plans: one local ``SavePlan`` per rank. Not mutated.
    :param ranks_per_node: ranks per node (0: ``LOCAL_WORLD_SIZE``, else one node).
    :param nodes: an explicit node id per rank; wins over ``ranks_per_node``.
    :returns: new plans; every item is written exactly once, by a rank that holds it.
    """
    node = node_ids(len(all_plans), ranks_per_node, nodes)
    holders: dict[tuple[str, tuple[int, ...]], list[int]] = {}
    size: dict[tuple[str, tuple[int, ...]], int] = {}
    for rank, plan in enumerate(all_plans):
        for item in plan.items:
            key = item_key(item)
            holders.setdefault(key, []).append(rank)
            size.setdefault(key, item_nbytes(item))
    load = [0] * len(all_plans)
    owner: dict[tuple[str, tuple[int, ...]], int] = {}
    # largest first, then by key: a deterministic order that balances well
    for key in sorted(holders, key=lambda k: (-size[k], k)):
        ranks = holders[key]
        lead = min(ranks)
        local = [r for r in ranks if node[r] == node[lead]]
        best = min(local, key=lambda r: (load[r], r))
        owner[key] = best
        load[best] += size[key]
    return [
        replace_plan(plan, items=[i for i in plan.items if owner[item_key(i)] == rank])
        for rank, plan in enumerate(all_plans)
    ]


@dcplan.hookimpl
def dcplan_register_strategies() -> list[dcplan.Strategy]:
    """Register ``node_local`` with dcplan."""
    return [
        dcplan.Strategy(
            name="node_local",
            func=node_local,
            description="each item is written on the node of its replica group's coordinator, balanced there",
            options={"ranks_per_node": 0, "nodes": None},
        )
    ]
