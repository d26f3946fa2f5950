"""Shared helpers for the balance, split and report tests: random layouts and a dedup checker."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from hypothesis import strategies as st

from dcplan.compat import SavePlan, WriteItemType
from dcplan.save.metadata import build_global_plan
from dcplan.save.validate import validate_global_plan
from dcplan.testing.plans import bytes_item, tensor_item

DTYPES = [torch.float32, torch.bfloat16, torch.int64, torch.uint8]


@st.composite
def layouts(draw: Any, max_world: int = 6, max_tensors: int = 8) -> list[SavePlan]:
    """Random local plans: tensors cut into chunks along dim 0, each chunk held by a random rank set."""
    world = draw(st.integers(1, max_world))
    per_rank: list[list[Any]] = [[] for _ in range(world)]
    ranks = st.sets(st.integers(0, world - 1), min_size=1)
    for t in range(draw(st.integers(0, max_tensors))):
        ndim = draw(st.integers(0, 3))
        shape = tuple(draw(st.lists(st.integers(1, 12), min_size=ndim, max_size=ndim)))
        dtype = draw(st.sampled_from(DTYPES))
        cuts: list[int] = []
        if ndim and shape[0] > 1 and draw(st.booleans()):
            cuts = sorted(draw(st.sets(st.integers(1, shape[0] - 1), max_size=3)))
        bounds = [0, *cuts, shape[0]] if ndim else [0, 0]
        for lo, hi in zip(bounds, bounds[1:]):
            if ndim:
                offsets = (lo,) + (0,) * (ndim - 1)
                sizes = (hi - lo,) + shape[1:]
            else:
                offsets, sizes = (), ()
            item = tensor_item(f"t{t}", shape, offsets, sizes, dtype)
            for r in sorted(draw(ranks)):
                per_rank[r].append(item)
    for b in range(draw(st.integers(0, 3))):
        item = bytes_item(f"obj{b}", nbytes=draw(st.integers(1, 200)))
        for r in sorted(draw(ranks)):
            per_rank[r].append(item)
    return [SavePlan(list(draw(st.permutations(items)))) for items in per_rank]


def snapshot(plans: Sequence[SavePlan]) -> list[list[tuple[Any, ...]]]:
    """A comparable description of plans: per rank, each item's identity and chunk."""
    out = []
    for p in plans:
        rows = []
        for it in p.items:
            td = it.tensor_data
            chunk = (tuple(td.chunk.offsets), tuple(td.chunk.sizes), td.properties.dtype) if td else None
            rows.append((it.index.fqn, tuple(it.index.offset or ()), it.type, chunk))
        out.append(rows)
    return out


def _contains(outer: Any, inner: Any) -> bool:
    return all(
        lo <= o and o + s <= lo + ls for o, s, lo, ls in zip(inner.offsets, inner.sizes, outer.offsets, outer.sizes)
    )


def check_dedup(local: Sequence[SavePlan], out: Sequence[SavePlan]) -> None:
    """Every byte of every item is written exactly once, by a rank that holds it."""
    assert len(out) == len(local)
    held: dict[tuple[int, str], list[Any]] = {}
    sizes: dict[str, Any] = {}
    for r, p in enumerate(local):
        for it in p.items:
            held.setdefault((r, it.index.fqn), []).append(it)
            sizes[it.index.fqn] = it.tensor_data.size if it.tensor_data is not None else None
    global_plan, metadata, errors = build_global_plan(out)
    assert errors == []
    errors = validate_global_plan(global_plan + [SavePlan([])], metadata)  # force the coverage check
    assert errors == []
    assert set(metadata.state_dict_metadata) == set(sizes)
    written: dict[str, int] = {}
    for r, p in enumerate(out):
        for it in p.items:
            mine = held.get((r, it.index.fqn))
            assert mine, f"rank {r} writes {it.index.fqn} which it does not hold"
            if it.type == WriteItemType.BYTE_IO:
                written[it.index.fqn] = written.get(it.index.fqn, 0) + 1
                continue
            chunk = it.tensor_data.chunk
            assert any(_contains(m.tensor_data.chunk, chunk) for m in mine), f"rank {r}: {chunk} not held"
            assert all(m.tensor_data.properties.dtype == it.tensor_data.properties.dtype for m in mine)
            written[it.index.fqn] = written.get(it.index.fqn, 0) + math.prod(chunk.sizes)
    for fqn, size in sizes.items():
        expected = 1 if size is None else math.prod(size)
        assert written.get(fqn, 0) == expected, fqn


def plan_digest() -> str:
    """A hash of every strategy's plans on small workloads (compared across PYTHONHASHSEEDs)."""
    import hashlib

    import dcplan
    from dcplan import workloads

    h = hashlib.sha256()
    for layout, model, world in [("ddp", "tiny", 7), ("hsdp2", "tiny", 6), ("tp2pp2dp3", "tiny", None), ("fsdp", "tiny", 5)]:
        plans = workloads.make(layout, model, world).plans
        for name, opts in [
            ("size_balanced", {}),
            ("size_balanced", {"mode": "torch"}),
            ("split", {"min_slice_bytes": 64}),
            ("lowest_rank", {}),
        ]:
            h.update(repr(snapshot(dcplan.dedup(plans, name, **opts))).encode())
    # generated layouts exercise every portfolio entry, the local search and node balance
    from dcplan.save.index import PlanIndex
    from dcplan_size_balanced import size_balanced

    for wl in workloads.random_layouts(12, seed=5, max_world=12):
        idx = PlanIndex(wl.plans, hosts=[f"h{r // 3}" for r in range(wl.world_size)])
        h.update(repr(snapshot(size_balanced(wl.plans, index=idx))).encode())
        h.update(repr(snapshot(size_balanced(wl.plans, balance="node", index=idx))).encode())
    return h.hexdigest()
