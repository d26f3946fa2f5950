"""dcplan-split: split large replicated tensors so that every holder writes a slice.

Whole-item assignment cannot beat its lower bound (an item that holds 30 % of a
replica group's bytes makes one rank write at least that). Splitting removes
the limit: a replicated tensor is cut into contiguous (row-major) slices, on
row boundaries of its first dimension of size > 1 where possible, and each
slice is written by a different holder, so the busiest rank gets within about
:data:`ROW_SLACK` of the ideal level.

Algorithm:

1. the exact divisible bound ``T`` and an integral flow reaching it
   (:func:`dcplan.save.divisible.divisible_flow`: per distinct holder set and
   rank, how many of the set's bytes that rank writes, fixed loads counted);
2. per holder set, items too small to split (``< 2 * min_slice_bytes``, 0-d
   tensors, non-tensor objects) go whole, largest first, to the holder with the
   most quota left (ties: lowest rank);
3. a second flow re-spreads the large items' bytes with those whole items
   counted as fixed loads, giving fresh quotas;
4. per holder set, the large items, largest first, are poured across the
   holders in rank order (McNaughton's wrap-around rule), each up to its quota
   plus an allowance (the smallest with which the last holder fits too): on
   row boundaries when that allowance is at most :data:`ROW_SLACK` of the
   level; else a cut goes back to the row boundary when that is within
   ``ROW_SLACK / 2`` of the level, otherwise to the last boundary of a finer
   sub-block or element (sub-row cut: the rank's share of the item is a
   flat element range, written as at most ``2 * (ndim - 1) + 1`` rectangles,
   :func:`flat_range_boxes`). No cut leaves a rectangle under
   ``min_slice_bytes``; slices smaller than it are merged into a neighbour, an
   item is cut into at most ``max_slices`` rectangles, and an item whose slices
   still hold a too-small rectangle falls back to row cuts.

Past the flow's edge budget (very many distinct overlapping holder sets) it
falls back to per-replica-group water levels (fewest holders first).

A split item becomes ``WriteItemType.SHARD`` items whose chunks are the slices
(offsets/sizes inside the held chunk), so the checkpoint's metadata lists the
slices as chunks. Any loader reads it: dcplan's, torch's ``DefaultLoadPlanner``
(bit-exact), and loads into other world sizes. Saving needs
``dcplan.SavePlanner``, whose ``resolve_data`` narrows a held tensor to a
slice (torch's planner can only resolve whole local chunks).

Options (``strategy_options``): ``min_slice_bytes`` (default ``"auto"``) and
``max_slices`` (default 1024). ``"auto"`` tries a 1 MiB floor, then smaller
ones (at most 0.1 % of the bound, then 8x smaller each time) while the busiest
rank is more than :data:`AUTO_FRACTION` (0.2 %) above the divisible bound,
keeping the best; an integer is a fixed floor (fewer, larger writes; the
busiest rank can exceed the level by up to about one ``min_slice_bytes``).
A slice of a split item is one or more rectangles, each its own write item.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import math
from collections.abc import Sequence
from typing import Any

import torch

import dcplan
from dcplan.compat import (
    ChunkStorageMetadata,
    MetadataIndex,
    SavePlan,
    TensorWriteData,
    WriteItem,
    WriteItemType,
    replace_plan,
)
from dcplan.gcpause import paused_gc
from dcplan.save.divisible import DivisibleFlow, divisible_flow, group_items
from dcplan.save.index import PlanIndex, index_plans

__all__ = ["split", "split_pieces", "water_level", "DEFAULT_MIN_SLICE_BYTES", "DEFAULT_MAX_SLICES", "AUTO_FRACTION", "ROW_SLACK", "flat_range_boxes", "split_dim"]

#: the largest slice floor ``"auto"`` uses (and the floor of older releases)
DEFAULT_MIN_SLICE_BYTES = 1 << 20
DEFAULT_MAX_SLICES = 1024
#: ``min_slice_bytes = "auto"``: retry with smaller floors while the busiest rank is this fraction above the bound
AUTO_FRACTION = 0.002
#: row cuts are kept when they leave no rank more than this fraction of the level over its quota;
#: else a cut inside a row goes back to the row boundary when that is within half this fraction
ROW_SLACK = 0.0005


def _slack(level: int) -> int:
    return int(level * ROW_SLACK / 2)


def water_level(loads: Sequence[int], extra: int) -> int:
    """The smallest integer ``T`` with ``sum(max(0, T - l) for l in loads) >= extra``."""
    if extra <= 0 or not loads:
        return min(loads, default=0)
    ls = sorted(loads)
    total = 0
    for i, lo in enumerate(ls):
        total += lo
        t = -(-(extra + total) // (i + 1))
        if i + 1 == len(ls) or t <= ls[i + 1]:
            return t
    raise AssertionError("unreachable")  # pragma: no cover


def split_dim(item: WriteItem) -> int | None:
    """The dimension whose rows ``split`` cuts (the first of size > 1); ``None``: the item is never cut."""
    td = item.tensor_data
    if td is None or td.chunk is None:
        return None
    for d, s in enumerate(td.chunk.sizes):
        if s > 1:
            return d
    return None


def flat_range_boxes(shape: Sequence[int], a: int, b: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """The flat (row-major) element range ``[a, b)`` of a C-contiguous tensor of ``shape`` as
    ``(offsets, sizes)`` hyper-rectangles, in flat order: partial trailing sub-blocks up to the next
    boundary of each dimension, a run of whole blocks, then partial leading sub-blocks. At most
    ``2 * (ndim - 1) + 1`` rectangles; one when the range is whole rows (or fits in one row).
    """
    n = len(shape)
    st = [1] * n
    for k in range(n - 2, -1, -1):
        st[k] = st[k + 1] * shape[k + 1]
    out: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    if a >= b:
        return out

    def box(lo: int, hi: int, k: int) -> None:
        # lo is a multiple of st[k]; [lo, hi) is whole st[k]-units inside one block of dim k - 1
        offs = []
        rem = lo
        for j in range(k + 1):
            offs.append(rem // st[j])
            rem %= st[j]
        out.append((tuple(offs) + (0,) * (n - k - 1), (1,) * k + ((hi - lo) // st[k],) + tuple(shape[k + 1:])))

    cur = a
    level = 0
    for k in range(n - 1, 0, -1):  # up: complete partial blocks, finest first
        blk = st[k - 1]
        if cur % blk:
            end = (cur // blk + 1) * blk
            if end > b:
                level = k
                break
            box(cur, end, k)
            cur = end
    for k in range(level, n):  # down: whole blocks, coarsest first
        end = cur + (b - cur) // st[k] * st[k]
        if end > cur:
            box(cur, end, k)
            cur = end
    return out


@dataclasses.dataclass
class _Cut:
    """One large item as the pour sees it: its chunk's shape, element bytes and cut granularities."""

    shape: tuple[int, ...]
    elem: int
    nbytes: int
    #: byte strides of the dimensions from the split one on (coarsest first): row, sub-row, ..., element
    strides: tuple[int, ...]
    #: :meth:`boxes` results of this pour, by range (the same ranges are asked for up to three times)
    seen: dict[tuple[int, int], list[tuple[tuple[int, ...], tuple[int, ...]]]] = dataclasses.field(
        default_factory=dict, repr=False, compare=False
    )

    @property
    def row(self) -> int:
        return self.strides[0]

    def boxes(self, lo: int, hi: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        """Rectangles of the element range ``[lo, hi)`` (a list the caller must not change)."""
        out = self.seen.get((lo, hi))
        if out is None:
            out = self.seen[lo, hi] = flat_range_boxes(self.shape, lo, hi)
        return out

    def cut_ok(self, c: int, min_bytes: int) -> bool:
        """Whether a cut at byte ``c`` leaves no rectangle under ``min_bytes`` inside its row."""
        if c % self.row == 0:
            return True
        e, row_e = c // self.elem, self.row // self.elem
        r0 = e // row_e * row_e
        return all(
            math.prod(sz) * self.elem >= min_bytes
            for _, sz in (*self.boxes(r0, e), *self.boxes(e, r0 + row_e))
        )

    def cut(self, x: int, slack: int, min_bytes: int) -> int:
        """The last allowed cut at or before byte ``x``: the row boundary when it is within ``slack``
        bytes, else the last boundary of a finer sub-block or element that leaves no rectangle under
        ``min_bytes`` (the row boundary when there is none)."""
        row = self.row
        r0 = x // row * row
        if x - r0 <= slack or x - r0 < min_bytes or row < 2 * min_bytes:
            return r0  # (each side of a cut inside a row holds at least one rectangle)
        best = r0
        for s in self.strides[1:]:
            for c in (x // s * s, (r0 + row - min_bytes) // s * s):
                if best < c <= x and self.cut_ok(c, min_bytes):
                    best = c
        return best

    def writes(self, pieces: Sequence[Sequence[int]]) -> int:
        return sum(len(self.boxes(lo, hi)) for _, lo, hi in pieces)


def _cut_info(item: WriteItem, dim: int, nbytes: int) -> _Cut:
    td = item.tensor_data
    assert td is not None and td.chunk is not None
    shape = tuple(td.chunk.sizes)
    elem = nbytes // math.prod(shape)
    strides: list[int] = []
    s = elem
    for d in range(len(shape) - 1, dim - 1, -1):
        if not strides or s != strides[-1]:
            strides.append(s)
        s *= shape[d]
    return _Cut(shape, elem, nbytes, tuple(reversed(strides)))


def _merge_small(pieces: list[list[int]], info: _Cut, min_bytes: int, max_slices: int) -> None:
    """Merge slices ``[rank, lo, hi]`` (element ranges) smaller than ``min_bytes`` into a neighbour,
    and while the slices need more than ``max_slices`` writes (rectangles)."""
    while len(pieces) > 1:
        sizes = [(hi - lo) * info.elem for _, lo, hi in pieces]
        i = min(range(len(pieces)), key=lambda j: (sizes[j], j))
        if sizes[i] >= min_bytes and (len(pieces) <= max_slices and info.writes(pieces) <= max_slices):
            return
        if i == 0:
            j = 1
        elif i == len(pieces) - 1:
            j = i - 1
        else:
            j = i - 1 if sizes[i - 1] <= sizes[i + 1] else i + 1
        lo = min(pieces[i][1], pieces[j][1])
        hi = max(pieces[i][2], pieces[j][2])
        pieces[j][1], pieces[j][2] = lo, hi
        del pieces[i]


def _to_rows(pieces: list[list[int]], info: _Cut) -> list[list[int]]:
    """The same slices with their inner boundaries moved to the nearest row boundary."""
    row_e = info.row // info.elem
    out: list[list[int]] = []
    prev = 0
    for i, (r, _, hi) in enumerate(pieces):
        b = hi if i == len(pieces) - 1 else max(prev, (hi + row_e // 2) // row_e * row_e)
        if b > prev:
            out.append([r, prev, b])
        prev = b
    return out


def _piece(item: WriteItem, rel: Sequence[int], sizes: Sequence[int]) -> WriteItem:
    td = item.tensor_data
    assert td is not None and td.chunk is not None
    off = torch.Size([o + d for o, d in zip(td.chunk.offsets, rel)])
    chunk = ChunkStorageMetadata(offsets=off, sizes=torch.Size(sizes))
    if type(item) is WriteItem and type(td) is TensorWriteData:  # the constructors: cheaper than replace
        return WriteItem(
            index=MetadataIndex(fqn=item.index.fqn, offset=off),
            type=WriteItemType.SHARD,
            tensor_data=TensorWriteData(chunk=chunk, properties=td.properties, size=td.size),
        )
    return dataclasses.replace(
        item,
        index=MetadataIndex(fqn=item.index.fqn, offset=off),
        type=WriteItemType.SHARD,
        tensor_data=dataclasses.replace(td, chunk=chunk),
    )


#: a split item as :func:`_pour` leaves it: the item, its cut info and its ``[rank, lo, hi]`` slices
_Slices = tuple[WriteItem, _Cut, list[list[int]]]


def _materialize(raw: dict[int, _Slices]) -> dict[int, list[tuple[int, WriteItem]]]:
    """Per split key, its ``(rank, slice item)`` list: one item per rectangle of each slice."""
    return {
        k: [(r, _piece(item, off, sz)) for r, a, b in cur for off, sz in info.boxes(a, b)]
        for k, (item, info, cur) in raw.items()
    }


def split_pieces(
    idx: PlanIndex, min_slice_bytes: int | str, max_slices: int
) -> tuple[list[int], dict[int, list[tuple[int, WriteItem]]]]:
    """Owners of whole items (``-1`` for split ones) and, per split key, its ``(rank, slice item)`` list.

    ``min_slice_bytes``: an integer floor, or ``"auto"`` (1 MiB, then smaller floors while the
    busiest rank is more than :data:`AUTO_FRACTION` above the divisible bound; see the module doc).
    """
    nb = idx.nbytes
    fixed, group_bytes = group_items(idx.holders, nb, idx.world_size)
    # every rank together is one subset: its average is a valid start for the search
    start = -(-(sum(fixed) + sum(group_bytes.values())) // max(1, idx.world_size))
    flow = divisible_flow(fixed, group_bytes, start=start)
    if flow is None:  # past the edge budget: per replica group water levels (module doc, fallback)
        floor = DEFAULT_MIN_SLICE_BYTES if min_slice_bytes == "auto" else int(min_slice_bytes)
        owner, raw = _water_pieces(idx, floor, max_slices)
        return owner, _materialize(raw)
    groups: dict[tuple[int, ...], list[int]] = {}
    for k, hs in enumerate(idx.holders):
        if len(hs) > 1:
            groups.setdefault(tuple(hs), []).append(k)
    if min_slice_bytes != "auto":
        owner, raw, _ = _quota_pieces(idx, fixed, groups, flow, int(min_slice_bytes), max_slices)
        return owner, _materialize(raw)
    target = flow.bound * (1 + AUTO_FRACTION)
    floor = DEFAULT_MIN_SLICE_BYTES
    best: tuple[list[int], dict[int, _Slices], int] | None = None
    cut_infos: dict[int, _Cut] = {}
    while True:
        got = _quota_pieces(idx, fixed, groups, flow, floor, max_slices, cut_infos)
        if best is None or got[2] < best[2]:
            best = got
        if best[2] <= target or floor <= 1:
            return best[0], _materialize(best[1])
        # retry with smaller slices: the overshoot is about one slice floor per rank and replica group
        floor = max(1, min(floor // 8, int(AUTO_FRACTION * flow.bound / 2)))


def _quota_pieces(
    idx: PlanIndex,
    fixed: Sequence[int],
    groups: dict[tuple[int, ...], list[int]],
    flow: DivisibleFlow,
    min_bytes: int,
    max_slices: int,
    cut_infos: dict[int, _Cut] | None = None,
) -> tuple[list[int], dict[int, _Slices], int]:
    """Pieces that follow the exact divisible flow's quotas; the third value is the busiest rank's bytes.

    ``cut_infos``: the items' cut infos by key, shared by the attempts of one :func:`split_pieces` call."""
    nb = idx.nbytes
    owner = [h[0] for h in idx.holders]
    threshold = 2 * min_bytes
    load = list(fixed)
    big_of: dict[tuple[int, ...], list[tuple[int, int]]] = {}
    # 1. items too small to split: largest first, to the holder with the most quota left
    for g, q in zip(flow.groups, flow.quotas):
        left = dict.fromkeys(g, 0)
        left.update(q)
        whole: list[int] = []
        big: list[tuple[int, int]] = []
        for k in groups[g]:
            dim = split_dim(idx.first[k]) if nb[k] >= threshold else None
            if dim is None:
                whole.append(k)
            else:
                big.append((k, dim))
        whole.sort(key=lambda k: (-nb[k], k))
        heap = [(-left[r], r) for r in g]
        heapq.heapify(heap)
        for k in whole:
            r = heap[0][1]
            owner[k] = r
            load[r] += nb[k]
            left[r] -= nb[k]
            heapq.heapreplace(heap, (-left[r], r))
        if big:
            big.sort(key=lambda kd: (-nb[kd[0]], kd[0]))
            big_of[g] = big
    # 2. the splittable bytes get fresh quotas around the whole items just placed
    big_bytes = {g: sum(nb[k] for k, _ in big) for g, big in big_of.items()}
    flow2 = divisible_flow(load, big_bytes, start=flow.bound)
    assert flow2 is not None  # a sub-graph of a graph within the budget
    pieces_of: dict[int, _Slices] = {}
    for g, q in zip(flow2.groups, flow2.quotas):
        # 3. pour the large items over the holders in rank order, each up to its quota (McNaughton)
        ranks = [r for r in g if q.get(r, 0) > 0]
        bounds = list(itertools.accumulate(q[r] for r in ranks))
        _pour(idx, big_of[g], ranks, bounds, min_bytes, max_slices, owner, load, pieces_of, _slack(flow.bound), cut_infos)
    return owner, pieces_of, max(load, default=0)


def _pour(
    idx: PlanIndex,
    big: Sequence[tuple[int, int]],
    g: Sequence[int],
    bounds: Sequence[int],
    min_bytes: int,
    max_slices: int,
    owner: list[int],
    load: list[int],
    pieces_of: dict[int, _Slices],
    slack: int,
    cut_infos: dict[int, _Cut] | None = None,
) -> None:
    """Cut ``big`` items (largest first, concatenated) so that rank ``g[j]`` writes about
    ``bounds[j] - bounds[j - 1]`` bytes (McNaughton's wrap-around rule).

    Each rank in turn takes bytes up to its quota plus an allowance ``a`` (the last one takes the
    rest), with ``a`` the smallest that keeps the last rank within its quota plus ``a`` too
    (bisection). With cuts on row boundaries only when that allowance is at most ``2 * slack``; else a
    cut goes back to the row boundary when that is within ``slack`` bytes, else to the
    last sub-block or element boundary that leaves no rectangle under ``min_bytes`` (sub-row cut: the
    rank's share of the item is then a few rectangles, :func:`flat_range_boxes`), else to the row
    boundary. An item whose slices still hold a rectangle under ``min_bytes`` after merging falls
    back to row cuts.
    """
    nb = idx.nbytes
    if cut_infos is None:
        cut_infos = {}
    infos = []
    for k, dim in big:  # (an item's cut info does not depend on the slice floor: shared by attempts)
        info = cut_infos.get(k)
        if info is None:
            info = cut_infos[k] = _cut_info(idx.first[k], dim, nb[k])
        infos.append(info)
    starts = [0, *itertools.accumulate(nb[k] for k, _ in big)]
    total = starts[-1]
    quota = [b - a for a, b in zip([0, *bounds[:-1]], bounds)]
    last = len(g) - 1

    rows = [info.row for info in infos]
    n_big = len(big)

    def cuts_for(allow: int, sl: int) -> list[int]:
        out = []
        prev = 0
        i = 0
        rows_only = sl >= total  # (then _Cut.cut is the row boundary at or before x: inlined)
        for j in range(last):
            x = prev + quota[j] + allow
            if x > total:
                x = total
            while i + 1 < n_big and starts[i + 1] <= x:
                i += 1
            s0, s1 = starts[i], starts[i + 1]
            if x >= s1:
                c = s1
            elif rows_only:
                c = s0 + (x - s0) // rows[i] * rows[i]
            else:
                c = s0 + infos[i].cut(x - s0, sl, min_bytes)
            if c > prev:
                prev = c
            out.append(prev)
        return out

    def least_allowance(sl: int) -> int:
        lo, hi = 0, max((info.row for info in infos), default=0)
        while lo < hi:
            mid = (lo + hi) // 2
            if total - (cuts_for(mid, sl)[-1] if last else 0) <= quota[last] + mid:
                hi = mid
            else:
                lo = mid + 1
        return lo

    # row cuts only, unless their allowance is more than 2 * slack: then cuts inside rows too
    sl = total
    allow = least_allowance(sl)
    if allow > 2 * slack:
        fine = least_allowance(slack)
        if fine < allow:
            sl, allow = slack, fine
    cuts = [*cuts_for(allow, sl), total]
    j = 0
    for i, (k, _) in enumerate(big):
        item = idx.first[k]
        info = infos[i]
        s0, s1 = starts[i], starts[i + 1]
        cur: list[list[int]] = []
        while j < last and cuts[j] <= s0:
            j += 1
        jj = j
        lo = 0
        while lo < info.nbytes:
            hi = info.nbytes if cuts[jj] >= s1 else cuts[jj] - s0
            if hi > lo:
                cur.append([g[jj], lo // info.elem, hi // info.elem])
            lo = max(lo, hi)
            jj += 1
        _merge_small(cur, info, min_bytes, max_slices)
        if len(cur) > 1 and any(
            math.prod(sz) * info.elem < min_bytes for _, a, b in cur for _, sz in info.boxes(a, b)
        ):
            cur = _to_rows(cur, info)
            _merge_small(cur, info, min_bytes, max_slices)
        for r, a, b in cur:
            load[r] += (b - a) * info.elem
        if len(cur) == 1:
            owner[k] = cur[0][0]
            continue
        owner[k] = -1
        pieces_of[k] = (item, info, cur)  # slice items are built for the attempt that is kept


def _water_pieces(
    idx: PlanIndex, floor: int, max_slices: int
) -> tuple[list[int], dict[int, _Slices]]:
    """The fallback past the flow's edge budget: per replica group (fewest holders first), whole
    items to the least-loaded holder, then the large ones poured up to the group's water level."""
    holders = idx.holders
    nb = idx.nbytes
    load = idx.fixed_loads()
    owner = [h[0] for h in holders]
    groups: dict[tuple[int, ...], list[int]] = {}
    for k, hs in enumerate(holders):
        if len(hs) > 1:
            groups.setdefault(tuple(hs), []).append(k)
    pieces_of: dict[int, _Slices] = {}
    for g in sorted(groups, key=lambda t: (len(t), t)):
        ks = groups[g]
        threshold = 2 * floor
        whole: list[int] = []
        big: list[tuple[int, int]] = []
        for k in ks:
            dim = split_dim(idx.first[k]) if nb[k] >= threshold else None
            if dim is None:
                whole.append(k)
            else:
                big.append((k, dim))
        whole.sort(key=lambda k: (-nb[k], k))
        heap = [(load[r], r) for r in g]
        heapq.heapify(heap)
        for k in whole:
            r = heap[0][1]
            owner[k] = r
            load[r] += nb[k]
            heapq.heapreplace(heap, (load[r], r))
        if not big:
            continue
        big.sort(key=lambda kd: (-nb[kd[0]], kd[0]))
        level = water_level([load[r] for r in g], sum(nb[k] for k, _ in big))
        bounds = list(itertools.accumulate(max(0, level - load[r]) for r in g))
        _pour(idx, big, g, bounds, floor, max_slices, owner, load, pieces_of, _slack(level))
    return owner, pieces_of


_AUTO = ' or "auto"'


def _check_options(min_slice_bytes: Any, max_slices: Any) -> None:
    if min_slice_bytes == "auto":
        min_slice_bytes = 1
    for name, value in (("min_slice_bytes", min_slice_bytes), ("max_slices", max_slices)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(
                f"split: {name} must be an integer >= 1{_AUTO if name == 'min_slice_bytes' else ''}, "
                f"got {value!r} "
                f"(e.g. strategy_options = {{{name} = {DEFAULT_MIN_SLICE_BYTES if name == 'min_slice_bytes' else 8}}})"
            )


def split(
    all_plans: Sequence[SavePlan],
    min_slice_bytes: int | str = "auto",
    max_slices: int = DEFAULT_MAX_SLICES,
    *,
    index: PlanIndex | None = None,
) -> list[SavePlan]:
    """Dedup that splits large replicated tensors into one contiguous slice per holder (see module doc).

    :param index: a :class:`PlanIndex` of ``all_plans`` (built here when ``None``).
    """
    _check_options(min_slice_bytes, max_slices)
    with paused_gc():
        return _split(all_plans, min_slice_bytes, max_slices, index)


def _split(
    all_plans: Sequence[SavePlan], min_slice_bytes: int | str, max_slices: int, index: PlanIndex | None
) -> list[SavePlan]:
    idx = index if index is not None else index_plans(all_plans)
    owner, pieces_of = split_pieces(idx, min_slice_bytes, max_slices)
    # Whole items keep their place in each rank's plan (a C-level filter); a rank's slices
    # follow them, in key order. Order inside a plan carries no meaning for DCP.
    slices: dict[int, list[WriteItem]] = {}
    for k in sorted(pieces_of):
        for r, it in pieces_of[k]:
            slices.setdefault(r, []).append(it)
    out = []
    for rank, plan in enumerate(idx.apply_owners(all_plans, owner)):  # split keys (owner -1) dropped
        extra = slices.get(rank)
        out.append(replace_plan(plan, items=plan.items + extra) if extra else plan)
    return out


@dcplan.hookimpl
def dcplan_register_strategies() -> list[dcplan.Strategy]:
    return [
        dcplan.Strategy(
            name="split",
            func=split,
            description=(
                "large replicated tensors are cut into contiguous slices, one per holder, so every "
                "holder writes its share (needs dcplan.SavePlanner to save; any loader reads it)"
            ),
            options={"min_slice_bytes": "auto", "max_slices": DEFAULT_MAX_SLICES},
            check_options=lambda o: _check_options(o["min_slice_bytes"], o["max_slices"]),
        )
    ]
