"""TEST ONLY: deliberately broken dedup strategies (see README.md).

Registered only when ``TEST_DCPLAN_ADVERSARIAL=1``; each breaks one rule of the
strategy contract in a way a plugin author could.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import torch

import dcplan
from dcplan.compat import ChunkStorageMetadata, MetadataIndex, SavePlan, WriteItem, WriteItemType, replace_plan
from dcplan.testing.plans import tensor_item

ENV = "TEST_DCPLAN_ADVERSARIAL"


def _lowest(all_plans: Sequence[SavePlan]) -> list[SavePlan]:
    """A correct baseline: each item to the lowest rank holding it."""
    seen: set[tuple[str, object]] = set()
    out = []
    for plan in all_plans:
        keep = []
        for item in plan.items:
            key = (item.index.fqn, None if item.index.offset is None else tuple(item.index.offset))
            if key not in seen:
                seen.add(key)
                keep.append(item)
        out.append(replace_plan(plan, items=keep))
    return out


def drop(all_plans: Sequence[SavePlan]) -> list[SavePlan]:
    out = _lowest(all_plans)
    r = max(range(len(out)), key=lambda i: (len(out[i].items), -i))
    out[r] = replace_plan(out[r], items=out[r].items[1:])
    return out


def invent(all_plans: Sequence[SavePlan]) -> list[SavePlan]:
    out = _lowest(all_plans)
    out[0] = replace_plan(out[0], items=[*out[0].items, tensor_item("adversarial.ghost", (4,))])
    return out


def _zero_offset(item: WriteItem) -> WriteItem:
    td = item.tensor_data
    if td is None or td.chunk is None or not any(td.chunk.offsets):
        return item
    return dataclasses.replace(item, index=MetadataIndex(item.index.fqn, torch.Size([0] * len(td.chunk.offsets))))


def misindex(all_plans: Sequence[SavePlan]) -> list[SavePlan]:
    out = _lowest(all_plans)
    return [replace_plan(p, items=[_zero_offset(i) for i in p.items]) for p in out]


def non_holder(all_plans: Sequence[SavePlan]) -> list[SavePlan]:
    out = _lowest(all_plans)
    world = len(out)
    for r, plan in enumerate(all_plans):
        held = {(i.index.fqn, None if i.index.offset is None else tuple(i.index.offset)) for i in plan.items}
        for src in range(world):
            for item in out[src].items:
                key = (item.index.fqn, None if item.index.offset is None else tuple(item.index.offset))
                if key not in held:  # move it to rank r, which does not hold it
                    out[src] = replace_plan(out[src], items=[i for i in out[src].items if i is not item])
                    out[r] = replace_plan(out[r], items=[*out[r].items, item])
                    return out
    return out  # every rank holds everything: nothing to break


def _halves(item: WriteItem, overlap: int) -> list[WriteItem] | None:
    td = item.tensor_data
    if td is None or td.chunk is None or not td.chunk.sizes or td.chunk.sizes[0] < 2:
        return None
    rows = td.chunk.sizes[0]
    cut = rows // 2
    pieces = []
    for lo, hi in ((0, min(rows, cut + overlap)), (cut, rows)):
        offs = list(td.chunk.offsets)
        sizes = list(td.chunk.sizes)
        offs[0] += lo
        sizes[0] = hi - lo
        chunk = ChunkStorageMetadata(offsets=torch.Size(offs), sizes=torch.Size(sizes))
        pieces.append(dataclasses.replace(
            item, index=MetadataIndex(item.index.fqn, torch.Size(offs)), type=WriteItemType.SHARD,
            tensor_data=dataclasses.replace(td, chunk=chunk),
        ))
    return pieces


def overlap_slices(all_plans: Sequence[SavePlan]) -> list[SavePlan]:
    out = _lowest(all_plans)
    for r, plan in enumerate(out):
        for item in plan.items:
            pieces = _halves(item, overlap=1)
            if pieces:
                out[r] = replace_plan(plan, items=[i for i in plan.items if i is not item] + pieces)
                return out
    return out


def dtype(all_plans: Sequence[SavePlan]) -> list[SavePlan]:
    out = _lowest(all_plans)
    for r, plan in enumerate(out):
        for item in plan.items:
            td = item.tensor_data
            if td is not None:
                other = torch.float16 if td.properties.dtype != torch.float16 else torch.float32
                bad = dataclasses.replace(
                    item, tensor_data=dataclasses.replace(td, properties=dataclasses.replace(td.properties, dtype=other))
                )
                out[r] = replace_plan(plan, items=[bad if i is item else i for i in plan.items])
                return out
    return out


def raising(all_plans: Sequence[SavePlan]) -> list[SavePlan]:
    raise RuntimeError("adversarial strategy: something went wrong inside the plugin")


def slow(all_plans: Sequence[SavePlan]) -> list[SavePlan]:
    """Correct output, quadratic time: every entry is compared with every earlier one."""
    out = []
    kept: list[tuple[str, object]] = []
    for plan in all_plans:
        keep = []
        for item in plan.items:
            key = (item.index.fqn, None if item.index.offset is None else tuple(item.index.offset))
            if not any(key == k for k in kept):  # a list scan: O(n) per entry
                kept.append(key)
                keep.append(item)
        out.append(replace_plan(plan, items=keep))
    return out


def mutate(all_plans: Sequence[SavePlan]) -> list[SavePlan]:
    """Sorts the item lists it was given in place (the contract says: do not mutate), then dedups."""
    for plan in all_plans:
        plan.items.sort(key=lambda it: it.index.fqn, reverse=True)
    return _lowest(all_plans)


def fresh(all_plans: Sequence[SavePlan]) -> list[SavePlan]:
    """Builds new SavePlans from the items alone: each rank's planner_data (its mapping) is lost."""
    return [SavePlan(list(p.items)) for p in _lowest(all_plans)]


STRATEGIES = {
    "adv_drop": (drop, "drops an item"),
    "adv_invent": (invent, "writes an item nobody holds"),
    "adv_misindex": (misindex, "MetadataIndex.offset differs from the chunk offset"),
    "adv_non_holder": (non_holder, "gives an item to a rank that does not hold it"),
    "adv_overlap_slices": (overlap_slices, "splits a tensor into overlapping slices"),
    "adv_dtype": (dtype, "writes an item with another dtype"),
    "adv_raising": (raising, "raises"),
    "adv_slow": (slow, "correct but quadratic"),
    "adv_mutate": (mutate, "sorts the plans it was given in place (the core must still save correctly)"),
    "adv_fresh": (fresh, "returns new plans without planner_data (the core keeps the mappings)"),
}


@dcplan.hookimpl
def dcplan_register_strategies() -> list[dcplan.Strategy]:
    if os.environ.get(ENV) != "1":
        return []
    return [dcplan.Strategy(name=n, func=f, description=f"TEST ONLY: {d}") for n, (f, d) in STRATEGIES.items()]
