"""Step 6 of a save, on the coordinator: validating the global plan against its metadata."""

from __future__ import annotations

import itertools
import math
import operator
from bisect import bisect_right, insort
from collections.abc import Sequence

from dcplan.compat import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    SavePlan,
)


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
