"""Deliberately broken dedup strategies: the conformance kit must catch each one.

Module-level so that the kit can pickle them by reference into its
PYTHONHASHSEED subprocesses.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from dcplan.compat import replace_plan
from dcplan.save.local import item_key, item_nbytes


def good_lowest(all_plans: Sequence[Any]) -> list[Any]:
    """A correct strategy: each item goes to the lowest rank holding it."""
    taken: set[Any] = set()
    out = []
    for plan in all_plans:
        keep = []
        for item in plan.items:
            if item_key(item) not in taken:
                taken.add(item_key(item))
                keep.append(item)
        out.append(replace_plan(plan, items=keep))
    return out


def writes_twice(all_plans: Sequence[Any]) -> list[Any]:
    """Bug: an item held by several ranks is kept by the first two of them."""
    count: dict[Any, int] = {}
    out = []
    for plan in all_plans:
        keep = []
        for item in plan.items:
            n = count.get(item_key(item), 0)
            count[item_key(item)] = n + 1
            if n < 2:
                keep.append(item)
        out.append(replace_plan(plan, items=keep))
    return out


def drops_item(all_plans: Sequence[Any]) -> list[Any]:
    """Bug (off by one): the last rank's plan is never looked at, so what only it holds is lost."""
    taken: set[Any] = set()
    out = []
    for plan in all_plans[:-1]:
        keep = [i for i in plan.items if item_key(i) not in taken]
        taken.update(item_key(i) for i in keep)
        out.append(replace_plan(plan, items=keep))
    out.append(replace_plan(all_plans[-1], items=[]))
    return out


def non_holder(all_plans: Sequence[Any]) -> list[Any]:
    """Bug: round-robin over ranks, ignoring who holds what."""
    items: dict[Any, Any] = {}
    for plan in all_plans:
        for item in plan.items:
            items.setdefault(item_key(item), item)
    per_rank: list[list[Any]] = [[] for _ in all_plans]
    for n, key in enumerate(sorted(items)):
        per_rank[n % len(all_plans)].append(items[key])
    return [replace_plan(p, items=i) for p, i in zip(all_plans, per_rank)]


def mutates_input(all_plans: Sequence[Any]) -> list[Any]:
    """Bug: dedups in place, editing the plans it was given."""
    taken: set[Any] = set()
    for plan in all_plans:
        plan.items[:] = [i for i in plan.items if item_key(i) not in taken]
        taken.update(item_key(i) for i in plan.items)
    return list(all_plans)


def hash_order(all_plans: Sequence[Any]) -> list[Any]:
    """Bug: greedy balancing over a *set of fqns*, whose order depends on PYTHONHASHSEED."""
    holders: dict[str, list[int]] = {}
    items: dict[str, list[Any]] = {}
    for rank, plan in enumerate(all_plans):
        for item in plan.items:
            holders.setdefault(item.index.fqn, []).append(rank)
            items.setdefault(item.index.fqn, [])
            if all(item_key(item) != item_key(i) for i in items[item.index.fqn]):
                items[item.index.fqn].append(item)
    load = [0] * len(all_plans)
    owner: dict[Any, int] = {}
    for fqn in set(holders):  # <- the bug: str hashing is randomized per process
        for item in items[fqn]:
            hs = sorted({r for r, p in enumerate(all_plans) if item in p.items})
            best = min(hs, key=lambda r: (load[r], r))
            load[best] += item_nbytes(item)
            owner[item_key(item)] = best
    return [
        replace_plan(p, items=[i for i in p.items if owner[item_key(i)] == r]) for r, p in enumerate(all_plans)
    ]


def coin_flip(all_plans: Sequence[Any]) -> list[Any]:
    """Bug: a random holder writes each item."""
    holders: dict[Any, list[int]] = {}
    for rank, plan in enumerate(all_plans):
        for item in plan.items:
            holders.setdefault(item_key(item), []).append(rank)
    owner = {k: random.choice(v) for k, v in holders.items()}
    return [
        replace_plan(p, items=[i for i in p.items if owner[item_key(i)] == r]) for r, p in enumerate(all_plans)
    ]


def _halves(item: Any) -> list[Any] | None:
    from dcplan.compat import WriteItemType
    from dcplan.testing.plans import tensor_item

    td = item.tensor_data
    if item.type != WriteItemType.TENSOR or len(td.size) == 0 or td.size[0] < 2:
        return None
    size = tuple(td.size)
    half = size[0] // 2
    rest = size[1:]
    dtype = td.properties.dtype
    return [
        tensor_item(item.index.fqn, size, (0, *[0] * len(rest)), (half, *rest), dtype=dtype),
        tensor_item(item.index.fqn, size, (half, *[0] * len(rest)), (size[0] - half, *rest), dtype=dtype),
    ]


def split_halves(all_plans: Sequence[Any], gap: bool = False) -> list[Any]:
    """A correct *splitting* strategy: a whole tensor held by 2+ ranks is written half by each of two holders.

    With ``gap=True`` it is broken: the second half's last row is lost.
    """
    from dcplan.testing.plans import tensor_item

    holders: dict[Any, list[int]] = {}
    for rank, plan in enumerate(all_plans):
        for item in plan.items:
            holders.setdefault(item_key(item), []).append(rank)
    per_rank: list[list[Any]] = [[] for _ in all_plans]
    done: set[Any] = set()
    for plan in all_plans:
        for item in plan.items:
            k = item_key(item)
            if k in done:
                continue
            done.add(k)
            hs = holders[k]
            parts = _halves(item) if len(hs) > 1 else None
            if parts is None:
                per_rank[hs[0]].append(item)
                continue
            first, second = parts
            if gap and second.tensor_data.chunk.sizes[0] > 1:
                td = second.tensor_data
                sizes = (td.chunk.sizes[0] - 1, *td.chunk.sizes[1:])
                second = tensor_item(k[0], tuple(td.size), tuple(td.chunk.offsets), sizes, dtype=td.properties.dtype)
            per_rank[hs[0]].append(first)
            per_rank[hs[1]].append(second)
    return [replace_plan(p, items=i) for p, i in zip(all_plans, per_rank)]


def split_with_gap(all_plans: Sequence[Any]) -> list[Any]:
    """Bug: a splitting strategy whose pieces do not tile the tensor."""
    return split_halves(all_plans, gap=True)
