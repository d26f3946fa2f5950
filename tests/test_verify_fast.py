"""The vectorised strategy-output verifier against simple references, on generated plans (issue 13).

Two references:

* :func:`reference_problems`: plain Python, obviously correct, brute force
  (every element of every held chunk is counted): which fqns break the
  strategy contract, and whether anything does;
* ``find_violations(..., fast=False)``: the verifier's exact per-item path, for
  the very same messages in the very same order (the fast paths only decide
  what certainly passes, so they must not change a verdict or a message).

Plans come from the real strategies on random layouts (hypothesis, derandomized),
and from seeded mutations of their output: dropped item, duplicated item,
overlapping slices, gap, wrong index offset, wrong chunk, non-holder writer,
slice outside its chunk, invented item.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
from collections import Counter
from collections.abc import Sequence
from typing import Any

import pytest
import torch
from _balance_plans import layouts
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dcplan
from dcplan.compat import ChunkStorageMetadata, MetadataIndex, SavePlan, WriteItem
from dcplan.save import verify
from dcplan.save.index import index_plans
from dcplan.testing.plans import tensor_item

STRATEGIES = ["size_balanced", "split", "lowest_rank", "torch"]
MUTATIONS = ["none", "drop", "duplicate", "overlap", "gap", "index_offset", "chunk_shift", "non_holder",
             "outside", "invent", "invent_slice"]


# ------------------------------------------------------------------ the plain reference
def _off(it: WriteItem) -> tuple[int, ...] | None:
    return None if it.index.offset is None else tuple(it.index.offset)


def _chunk(it: WriteItem) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    td = it.tensor_data
    if td is None or td.chunk is None:
        return None
    return tuple(td.chunk.offsets), tuple(td.chunk.sizes)


def _meet(a: Any, b: Any) -> bool:
    """Two boxes share an element (boxes without elements share none)."""
    if 0 in a[1] or 0 in b[1]:
        return False
    return all(ao < bo + bs and bo < ao + as_ for ao, as_, bo, bs in zip(a[0], a[1], b[0], b[1]))


def _inside(inner: Any, outer: Any) -> bool:
    return len(inner[0]) == len(outer[0]) and all(
        lo <= o and o + s <= lo + ls for o, s, lo, ls in zip(inner[0], inner[1], outer[0], outer[1])
    )


def reference_problems(local: Sequence[SavePlan], out: Sequence[SavePlan]) -> set[str]:
    """The fqns whose items break the contract (the verdict is ``bool`` of it), by brute force."""
    held: dict[tuple[str, Any], tuple[WriteItem, set[int]]] = {}
    for r, p in enumerate(local):
        for it in p.items:
            held.setdefault((it.index.fqn, _off(it)), (it, set()))[1].add(r)
    bad: set[str] = set()
    whole: Counter[tuple[str, Any]] = Counter()
    pieces: dict[tuple[str, Any], list[WriteItem]] = {}
    for r, p in enumerate(out):
        for it in p.items:
            fqn, key = it.index.fqn, (it.index.fqn, _off(it))
            if key in held:
                ref, ranks = held[key]
                if (it.tensor_data is None) != (ref.tensor_data is None):
                    bad.add(fqn)
                    continue
                if it.tensor_data is None or _chunk(it) == _chunk(ref):
                    td, rtd = it.tensor_data, ref.tensor_data
                    if td is not None and rtd is not None and (
                        td.properties.dtype != rtd.properties.dtype or tuple(td.size) != tuple(rtd.size)
                    ):
                        bad.add(fqn)
                        continue
                    whole[key] += 1
                    if r not in ranks:
                        bad.add(fqn)
                    continue
            # a slice of some held chunk of the same fqn
            ch = _chunk(it)
            if ch is None or _off(it) != ch[0]:
                bad.add(fqn)
                continue
            mine = [k for k, (h, ranks) in held.items()
                    if k[0] == fqn and _chunk(h) is not None and _inside(ch, _chunk(h)) and r in ranks]
            if not mine:
                bad.add(fqn)
                continue
            pieces.setdefault(mine[0], []).append(it)
    for key, got in pieces.items():
        ref = held[key][0]
        rtd = ref.tensor_data
        assert rtd is not None
        if whole[key] or any(
            g.tensor_data.properties.dtype != rtd.properties.dtype or tuple(g.tensor_data.size) != tuple(rtd.size)
            for g in got  # type: ignore[union-attr]
        ):
            bad.add(key[0])
            continue
        boxes = [_chunk(g) for g in got]
        volume = sum(math.prod(b[1]) for b in boxes)  # type: ignore[index]
        overlap = any(_meet(a, b) for a, b in itertools.combinations(boxes, 2))
        if overlap or volume != math.prod(_chunk(ref)[1]):  # type: ignore[index]
            bad.add(key[0])  # (every box lies inside the chunk: no overlap + full volume = an exact tiling)
    for key in held:
        n = whole[key] + (1 if key in pieces else 0)
        if n != 1:
            bad.add(key[0])
    return bad


# ------------------------------------------------------------------ mutations
def _with_chunk(it: WriteItem, offsets: Sequence[int], sizes: Sequence[int], index_offset: Any = "same") -> WriteItem:
    td = it.tensor_data
    assert td is not None
    off = torch.Size(offsets)
    chunk = ChunkStorageMetadata(offsets=off, sizes=torch.Size(sizes))
    idx_off = off if index_offset == "same" else index_offset
    return dataclasses.replace(it, index=MetadataIndex(fqn=it.index.fqn, offset=idx_off),
                               tensor_data=dataclasses.replace(td, chunk=chunk))


def _positions(out: Sequence[SavePlan], pred: Any = lambda it: True) -> list[tuple[int, int]]:
    return [(r, i) for r, p in enumerate(out) for i, it in enumerate(p.items) if pred(it)]


def _sliced(it: WriteItem) -> bool:
    td = it.tensor_data
    return td is not None and td.chunk is not None and len(td.chunk.sizes) > 0 and td.chunk.sizes[0] > 1


def mutate(local: Sequence[SavePlan], out: Sequence[SavePlan], how: str, rng: random.Random) -> list[SavePlan] | None:
    """``out`` with one defect of kind ``how`` (``None`` when the plans offer no place for it)."""
    items = [list(p.items) for p in out]
    holders: dict[tuple[str, Any], set[int]] = {}
    for r, p in enumerate(local):
        for it in p.items:
            holders.setdefault((it.index.fqn, _off(it)), set()).add(r)
    world = len(out)
    if how == "none":
        pass
    elif how in ("drop", "duplicate", "non_holder"):
        pos = _positions(out)
        if not pos:
            return None
        r, i = rng.choice(pos)
        it = items[r][i]
        if how == "drop":
            del items[r][i]
        elif how == "duplicate":
            items[rng.randrange(world)].append(it)
        else:
            others = [q for q in range(world) if q not in holders.get((it.index.fqn, _off(it)), set())]
            if not others:
                return None
            del items[r][i]
            items[rng.choice(others)].append(it)
    elif how in ("overlap", "gap", "index_offset", "chunk_shift", "outside"):
        pos = _positions(out, lambda it: it.tensor_data is not None and len(it.tensor_data.size) > 0)
        if how in ("overlap", "gap"):
            pos = [(r, i) for r, i in pos if _sliced(out[r].items[i])]
            split = [(r, i) for r, i in pos if (out[r].items[i].index.fqn, _off(out[r].items[i])) not in holders]
            pos = split or pos  # prefer a strategy's slice to a whole item
        if not pos:
            return None
        r, i = rng.choice(pos)
        it = items[r][i]
        off, sz = (list(x) for x in _chunk(it))  # type: ignore[misc]
        size = list(it.tensor_data.size)  # type: ignore[union-attr]
        if how == "overlap":  # a second piece covering the first row again
            items[r].append(_with_chunk(it, off, [1, *sz[1:]]))
        elif how == "gap":  # the piece loses its first row
            items[r][i] = _with_chunk(it, [off[0] + 1, *off[1:]], [sz[0] - 1, *sz[1:]])
        elif how == "index_offset":
            items[r][i] = dataclasses.replace(
                it, index=MetadataIndex(fqn=it.index.fqn, offset=torch.Size([o + 1 for o in off])))
        elif how == "chunk_shift":  # chunk moved, index offset left behind
            if off[0] + sz[0] >= size[0]:
                return None
            items[r][i] = _with_chunk(it, [off[0] + 1, *off[1:]], sz, index_offset=it.index.offset)
        else:  # outside: the chunk runs past the tensor's end
            items[r][i] = _with_chunk(it, off, [sz[0] + size[0], *sz[1:]])
    elif how == "invent":
        items[rng.randrange(world)].append(tensor_item("ghost", (4, 2)))
    elif how == "invent_slice":
        pos = _positions(out, lambda it: it.tensor_data is not None and len(it.tensor_data.size) > 0)
        if not pos:
            return None
        r, i = rng.choice(pos)
        it = items[r][i]
        items[r].append(_with_chunk(it, [it.tensor_data.size[0] + 3, *([0] * (len(it.tensor_data.size) - 1))],  # type: ignore[union-attr]
                                    [1, *it.tensor_data.size[1:]]))  # type: ignore[union-attr]
    return [dataclasses.replace(p, items=its) for p, its in zip(out, items)]


# ------------------------------------------------------------------ the tests
def _compare(local: Sequence[SavePlan], out: Sequence[SavePlan]) -> tuple[set[str], list[str]]:
    index = index_plans(local)
    fast = verify.find_violations(index, out, keep=1000)
    slow = verify.find_violations(index, out, keep=1000, fast=False)
    assert fast.shown == slow.shown and fast.total == slow.total
    ref = reference_problems(local, out)
    assert bool(fast) == bool(ref), (fast.shown, ref)
    named = {f for f in _fqns(local, out) if any(f"'{f}'" in v or f"{f}[" in v for v in fast.shown)}
    assert named == ref, (fast.shown, ref)
    return ref, fast.shown


def _fqns(*groups: Sequence[SavePlan]) -> set[str]:
    return {it.index.fqn for plans in groups for p in plans for it in p.items}


def _dedup(local: Sequence[SavePlan], strategy: str) -> list[SavePlan]:
    opts: dict[str, Any] = {"min_slice_bytes": 1} if strategy == "split" else {}
    return list(dcplan.dedup(list(local), strategy, **opts))


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(local=layouts(max_world=6, max_tensors=6), strategy=st.sampled_from(STRATEGIES),
       how=st.sampled_from(MUTATIONS), seed=st.integers(0, 2**16))
def test_fast_verifier_agrees_with_the_references(local: list[SavePlan], strategy: str, how: str, seed: int) -> None:
    out = _dedup(local, strategy)
    mutated = mutate(local, out, how, random.Random(seed))
    if mutated is None:
        return
    ref, _ = _compare(local, mutated)
    if how == "none":
        assert ref == set()


@pytest.mark.parametrize("how", MUTATIONS)
@pytest.mark.parametrize("seed", range(4))
def test_fast_verifier_on_a_realistic_split(how: str, seed: int) -> None:
    """An HSDP-like layout at small scale: every mutation kind on split's slices, found the same way."""
    from dcplan import workloads

    wl = workloads.make("hsdp8", "tiny", 16)
    local = wl.plans
    out = _dedup(local, "split")
    mutated = mutate(local, out, how, random.Random(seed))
    if mutated is None:
        pytest.skip(f"no place for {how}")
    ref, shown = _compare(local, mutated)
    assert bool(ref) == (how != "none"), shown


def test_first_violations_are_the_same_and_in_order() -> None:
    """Many violations at once: the first few (what the error shows) are identical on both paths."""
    rng = random.Random(7)
    local = [SavePlan([tensor_item(f"x{t}y", (8, 4)) for t in range(12)]) for _ in range(4)]
    out = _dedup(local, "split")
    for how in ("drop", "overlap", "index_offset", "non_holder", "invent", "gap", "duplicate"):
        out = mutate(local, out, how, rng) or out
    index = index_plans(local)
    fast = verify.find_violations(index, out)
    slow = verify.find_violations(index, out, fast=False)
    assert fast.shown == slow.shown and fast.total == slow.total and fast.total >= 5
