"""Pure planning logic: plans in, plans out. No process group needed.

These functions back dcplan's built-in hook implementations and are public so
that plugin authors and benchmarks can reuse them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import io
import itertools
import math
import operator
from bisect import bisect_right, insort
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from dcplan import compat
from dcplan.compat import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    SavePlan,
    TensorStorageMetadata,
    WriteItem,
    WriteItemType,
)

__all__ = [
    "create_local_save_plan",
    "build_global_plan",
    "validate_global_plan",
    "item_nbytes",
    "item_key",
    "chunk_of",
    "plan_digest",
]


def item_key(item: WriteItem) -> tuple[str, tuple[int, ...]]:
    """The identity DCP uses for an item: fqn and chunk offset (``MetadataIndex`` equality)."""
    return (item.index.fqn, tuple(item.index.offset or ()))


_FQN = operator.attrgetter("index.fqn")
_OFFSET = operator.attrgetter("index.offset")


def plan_digest(items: Sequence[WriteItem]) -> bytes:
    """A 16-byte digest of the keys (fqn, offset) of a plan's items, in order.

    Each rank computes it on its own local plan (a C-level pass: about a
    millisecond per 3,000 items) and sends it with the plan; the
    coordinator indexes ranks with equal digests once
    (:class:`dcplan.report.PlanIndex`), which removes the per-entry work that
    dominates its planning time on replicated layouts (DDP, HSDP, TP x PP x DP).
    Equal key sequences usually give equal digests; unequal ones never do
    (pickle is injective and BLAKE2b collisions are out of reach), and an
    unexpected difference only costs speed.
    """
    import hashlib
    import pickle

    offsets = [None if o is None else tuple(o) for o in map(_OFFSET, items)]  # bytes items: None
    data = pickle.dumps((list(map(_FQN, items)), offsets), protocol=4)
    return hashlib.blake2b(data, digest_size=16).digest()


def chunk_of(item: WriteItem) -> ChunkStorageMetadata | None:
    td = item.tensor_data
    return td.chunk if td is not None else None


def item_nbytes(item: WriteItem) -> int:
    """Bytes this item actually writes: chunk numel x element size.

    Non-tensor items weigh their serialized size when the local plan recorded it
    (``bytes_io_data.nbytes``, torch 2.8+), else 1.
    """
    td = item.tensor_data
    if td is None:
        n = compat.bytes_item_size(item)
        return int(n) if n else 1
    sizes = td.chunk.sizes if td.chunk is not None else td.size
    dtype = td.properties.dtype
    return int(math.prod(sizes)) * torch.empty((), dtype=dtype).element_size()


def _serialized_size(obj: Any) -> int:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.tell()


def create_local_save_plan(state_dict: dict[str, Any], *, measure_bytes: bool = True) -> SavePlan:
    """This rank's local plan: every tensor, shard and object it holds.

    Unlike torch 2.4-2.15's default it skips DTensors whose mesh excludes this
    rank on every version, and records non-tensor sizes (2.8+) so balancing can
    weigh them.
    """
    items: list[WriteItem] = []
    for fqn, obj in state_dict.items():
        if not compat.dtensor_on_this_rank(obj):
            continue
        for item in compat.create_write_items(fqn, obj):
            if measure_bytes and item.type == WriteItemType.BYTE_IO and compat.HAS_BYTES_IO_DATA:
                item = compat.with_bytes_size(item, _serialized_size(obj))
            items.append(item)
    return SavePlan(items)


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector (planning allocates millions of acyclic objects).

    With millions of live plan objects every automatic collection walks all of
    them, which can double the coordinator's planning time; nothing planning
    creates is cyclic, so pausing loses nothing. Re-entrant.

    On the way out, the objects allocated meanwhile are handed to the oldest
    generation (``gc.freeze`` + ``gc.unfreeze``, both O(1)) instead of being
    walked by the first young collection after the pause (seconds for millions
    of plan objects); most of them are freed by reference counting before a
    full collection would look at them. Skipped when the application keeps
    objects frozen itself (``gc.get_freeze_count() > 0``, e.g. before forking
    workers): their frozen state is left alone.
    """
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            if gc.get_freeze_count() == 0:
                gc.freeze()
                gc.unfreeze()
            gc.enable()


def build_global_plan(
    all_plans: Sequence[SavePlan], *, merge_planner_data: bool = True
) -> tuple[list[SavePlan], Metadata, list[str]]:
    """Build the metadata from deduped plans and rewrite index hints.

    :returns: ``(global_plan, metadata, errors)``. ``errors`` lists items written
        twice and tensors whose ranks disagree on dtype or global size; the
        caller refuses to save when it is non-empty.
    """
    md: dict[str, Any] = {}
    owner: dict[str, int] = {}
    errors: list[str] = []
    seen_chunks: set[tuple[str, Any]] = set()
    seen_add = seen_chunks.add
    md_get = md.get
    new_plans: list[SavePlan] = []
    byte_io, shard = WriteItemType.BYTE_IO, WriteItemType.SHARD
    tsm = TensorStorageMetadata
    with_hint = compat.with_index_hint
    for rank, plan in enumerate(all_plans):
        new_items: list[WriteItem] = []
        append = new_items.append
        for item in plan.items:
            fqn = item.index.fqn
            if item.type is byte_io:
                if fqn in md:
                    errors.append(
                        f"key:{fqn} is written by rank {owner[fqn]} and rank {rank} "
                        "(the dedup strategy must give each item to exactly one rank)"
                    )
                    continue
                md[fqn] = BytesStorageMetadata()
                owner[fqn] = rank
                append(item)
                continue
            td = item.tensor_data
            if td is None or td.chunk is None:
                errors.append(f"key:{fqn} has a tensor item without chunk bounds (rank {rank})")
                continue
            chunk = td.chunk
            existing = md_get(fqn)
            if existing is None:
                existing = tsm(properties=td.properties, size=td.size, chunks=[])
                md[fqn] = existing
                owner[fqn] = rank
            elif existing.__class__ is not tsm:
                errors.append(f"key:{fqn} is a tensor on rank {rank} but an object on rank {owner[fqn]}")
                continue
            else:
                if existing.properties.dtype is not td.properties.dtype and (
                    existing.properties.dtype != td.properties.dtype
                ):
                    errors.append(
                        f"key:{fqn} has dtype {existing.properties.dtype} on rank {owner[fqn]} "
                        f"but {td.properties.dtype} on rank {rank}"
                    )
                if existing.size != td.size and tuple(existing.size) != tuple(td.size):
                    errors.append(
                        f"key:{fqn} has global size {tuple(existing.size)} on rank {owner[fqn]} "
                        f"but {tuple(td.size)} on rank {rank}"
                    )
                if item.type is not shard:
                    errors.append(
                        f"key:{fqn} is written by rank {owner[fqn]} and rank {rank} "
                        "(the dedup strategy must give each item to exactly one rank)"
                    )
                    continue
            ck: tuple[str, Any] = (fqn, chunk.offsets)  # torch.Size hashes and compares as a tuple
            try:
                dup = ck in seen_chunks
            except TypeError:  # offsets given as a list by a plugin
                ck = (fqn, tuple(chunk.offsets))
                dup = ck in seen_chunks
            if dup:
                errors.append(
                    f"key:{fqn} chunk at offset {tuple(chunk.offsets)} is written twice "
                    f"(again by rank {rank})"
                )
                continue
            seen_add(ck)
            chunks = existing.chunks
            append(with_hint(item, len(chunks)))
            chunks.append(chunk)
        new_plans.append(compat.replace_plan(plan, items=new_items))

    metadata = Metadata(state_dict_metadata=md)
    if merge_planner_data:
        merged: dict[str, Any] = {}
        for plan in new_plans:
            if isinstance(plan.planner_data, dict):
                merged.update(plan.planner_data)
        metadata = dataclasses.replace(metadata, planner_data=merged)
    return new_plans, metadata, errors


# ---------------------------------------------------------------- validation
def _sweep_dim(chunks: Sequence[ChunkStorageMetadata], size: Sequence[int]) -> int:
    """The dimension along which chunk offsets vary most (ties: larger dim)."""
    best, best_key = 0, (-1, -1)
    for d in range(len(size)):
        distinct = len({c.offsets[d] for c in chunks})
        key = (distinct, size[d])
        if key > best_key:
            best, best_key = d, key
    return best


def _overlap(a: ChunkStorageMetadata, b: ChunkStorageMetadata) -> bool:
    for d in range(len(a.offsets)):
        if a.offsets[d] >= b.offsets[d] + b.sizes[d] or b.offsets[d] >= a.offsets[d] + a.sizes[d]:
            return False
    return True


def _has_volume(c: ChunkStorageMetadata) -> bool:
    return all(s > 0 for s in c.sizes)


def _overlaps(key: str, chunks: Sequence[ChunkStorageMetadata], size: Sequence[int]) -> list[str]:
    """Overlapping pairs, O(n log n) for grid layouts (any sharded dims).

    1. Grid test: when every chunk spans exactly one cell of the grid formed by
       all chunk boundaries, chunks overlap iff two share a cell (a dict lookup).
    2. Otherwise a sweep line along the dimension whose offsets vary most, so a
       split along a non-largest dimension (``Shard(1)``) stays near-linear.
    """
    chunks = [c for c in chunks if _has_volume(c)]
    if len(chunks) < 2:
        return []
    dims = len(size)
    bounds = []
    for d in range(dims):
        pts = sorted({c.offsets[d] for c in chunks} | {c.offsets[d] + c.sizes[d] for c in chunks})
        bounds.append({p: i for i, p in enumerate(pts)})
    grid = True
    cells: dict[tuple[int, ...], ChunkStorageMetadata] = {}
    errors: list[str] = []
    for c in chunks:
        cell = []
        for d in range(dims):
            lo, hi = bounds[d][c.offsets[d]], bounds[d][c.offsets[d] + c.sizes[d]]
            if hi != lo + 1:
                grid = False
                break
            cell.append(lo)
        if not grid:
            break
        t = tuple(cell)
        if t in cells:
            errors.append(f"key:{key} has overlapping chunks: {c} {cells[t]}")
        else:
            cells[t] = c
    if grid:
        return errors

    sd = _sweep_dim(chunks, size)
    order = sorted(range(len(chunks)), key=lambda i: (chunks[i].offsets[sd], tuple(chunks[i].offsets)))
    active: list[tuple[int, int]] = []
    errors = []
    for idx in order:
        cur = chunks[idx]
        start = cur.offsets[sd]
        cut = bisect_right(active, (start, -1))
        if cut:
            del active[:cut]
        for _, other in active:
            if _overlap(cur, chunks[other]):
                errors.append(f"key:{key} has overlapping chunks: {cur} {chunks[other]}")
        insort(active, (start + cur.sizes[sd], idx))
    return errors


#: tensors with at least this many chunks are checked with numpy first
_NUMPY_MIN_CHUNKS = 16
_OFFSETS = operator.attrgetter("offsets")
_SIZES = operator.attrgetter("sizes")


def _fast_chunk_check(chunks: Sequence[ChunkStorageMetadata], size: tuple[int, ...]) -> int | None:
    """Vectorized check of many chunks: in bounds, no two overlapping (grid layouts).

    :returns: the chunks' total volume when everything is fine, or ``None``
        when the exact (slower) check must run to find and name the problem,
        or because the chunks do not form a grid.
    """
    import numpy as np

    n, dims = len(chunks), len(size)
    offs = list(map(_OFFSETS, chunks))
    sizes = list(map(_SIZES, chunks))
    if set(map(len, offs)) != {dims} or set(map(len, sizes)) != {dims}:
        return None
    off = np.fromiter(itertools.chain.from_iterable(offs), dtype=np.int64, count=n * dims).reshape(n, dims)
    sz = np.fromiter(itertools.chain.from_iterable(sizes), dtype=np.int64, count=n * dims).reshape(n, dims)
    end = off + sz
    if (off < 0).any() or (sz < 0).any() or (end > np.asarray(size, dtype=np.int64)).any():
        return None
    volume = int(np.prod(sz, axis=1).sum())
    solid = (sz > 0).all(axis=1)
    if not solid.all():
        off, end = off[solid], end[solid]
    if len(off) < 2:
        return volume
    cells = np.empty_like(off)
    for d in range(dims):
        pts = np.unique(np.concatenate((off[:, d], end[:, d])))
        lo = np.searchsorted(pts, off[:, d])
        if not (np.searchsorted(pts, end[:, d]) == lo + 1).all():
            return None  # not a grid: the sweep decides
        cells[:, d] = lo
    order = np.lexsort(cells.T[::-1])
    sc = cells[order]
    if (sc[1:] == sc[:-1]).all(axis=1).any():
        return None  # two chunks in one cell: the exact check names them
    return volume


def validate_global_plan(global_plan: Sequence[SavePlan], metadata: Metadata) -> list[str]:
    """Bounds, overlap and coverage of every tensor's chunks; returns errors.

    The coverage (volume) check is skipped for a single-plan global plan, as
    torch does for rank-local saves. Tensors with many chunks are checked with
    numpy first; the exact per-chunk check runs only where that finds a
    problem (to name it) or the chunks do not form a grid.
    """
    errors: list[str] = []
    for key, value in metadata.state_dict_metadata.items():
        if isinstance(value, BytesStorageMetadata):
            continue
        size = tuple(value.size)
        if len(size) == 0:
            continue
        chunks = value.chunks
        if len(chunks) == 1:  # fast path: one chunk covering the whole tensor (replicated/plain)
            c = chunks[0]
            if len(c.offsets) == len(size) and tuple(c.sizes) == size and not any(c.offsets):
                continue
        elif len(chunks) >= _NUMPY_MIN_CHUNKS:
            volume = _fast_chunk_check(chunks, size)
            if volume is not None:
                total = math.prod(size)
                if len(global_plan) > 1 and volume != total:
                    errors.append(f"key:{key} invalid fill tensor-volume: {total} chunks-volume: {volume}")
                continue
        volume = 0
        bad = False
        for c in chunks:
            if len(c.offsets) != len(size) or len(c.sizes) != len(size):
                errors.append(f"key:{key} chunk {c} has the wrong rank for tensor-size {size}")
                bad = True
                continue
            if min(c.offsets) < 0 or min(c.sizes) < 0 or any(map(operator.gt, map(operator.add, c.offsets, c.sizes), size)):
                errors.append(f"key:{key} has out of bounds chunk: tensor-size:{size} chunk: {c}")
                bad = True
            volume += math.prod(c.sizes)
        if bad:
            continue
        errors.extend(_overlaps(key, chunks, size))
        total = math.prod(size)
        if len(global_plan) > 1 and volume != total:
            errors.append(f"key:{key} invalid fill tensor-volume: {total} chunks-volume: {volume}")
    return errors
