"""Step 4 of a save, on the coordinator: the core's checks around the strategy.

dcplan is a plugin framework, so the core cannot trust what a third-party
strategy returns. Two checks run on the coordinator before any byte is written:

* :func:`check_consistency`, *before* dedup: every rank that holds a key agrees
  on whether it is a tensor or an object, and on its dtype and global size
  (after dedup only one copy is left, so a disagreement would go unseen);
* :func:`verify_dedup`, right *after* dedup: every item some rank holds is
  written exactly once, whole or as slices that tile it exactly; every write
  is by a rank that holds it and lies inside the chunk that rank holds; every
  tensor item's ``MetadataIndex.offset`` equals its chunk offset; nothing is
  invented.

Both are linear in plan entries. The written items that are the held item
objects themselves are found by identity (a map local to the call); only the
others are read (once: their fields serve the key lookup, the whole-item test
and the slice checks) and looked up in the :class:`~dcplan.save.index.PlanIndex`
with C-level maps. Holders are checked with one numpy search. Slices are matched
to the one chunk of their fqn their rank's plan holds, and containment, index
offset, dtype/size and exact tiling (intervals along the one dimension they
split) are checked with numpy arrays. What is not certainly right takes the
exact per-item path, which words the violations: the fast paths decide only
what passes, so verdicts and messages are those of the per-item path
(``find_violations(..., fast=False)``; ``tests/test_verify_fast.py`` compares them).
A violation raises :class:`dcplan.errors.StrategyError` (after dedup) or
:class:`dcplan.errors.PlanValidationError` (before), which torch's
``reduce_scatter`` hands to every rank.
"""

from __future__ import annotations

import itertools
import math
import operator
from bisect import bisect_right
from collections.abc import Sequence
from typing import Any

from dcplan.compat import SavePlan, WriteItem, WriteItemType
from dcplan.errors import PlanValidationError, StrategyError
from dcplan.save.index import PlanIndex

__all__ = ["Violations", "check_consistency", "find_violations", "verify_dedup"]

#: how many violations a message shows in full
SHOWN = 5
_KEY = operator.attrgetter("index.fqn", "index.offset")


class Violations:
    """Violations in plain words: the first :data:`SHOWN` kept in full, all counted."""

    def __init__(self, keep: int = SHOWN) -> None:
        self.keep = keep
        self.shown: list[str] = []
        self.total = 0

    def add(self, msg: str) -> None:
        self.total += 1
        if len(self.shown) < self.keep:
            self.shown.append(msg)

    @property
    def full(self) -> bool:
        """Whether further messages would only be counted (callers may skip formatting them)."""
        return len(self.shown) >= self.keep

    def __bool__(self) -> bool:
        return self.total > 0


def _where(fqn: str, offsets: Any, sizes: Any = None) -> str:
    if offsets is None:
        return repr(fqn)
    if sizes is None:
        return f"{fqn!r} at offset {tuple(offsets)}"
    return f"{fqn}[" + ", ".join(f"{o}:{o + s}" for o, s in zip(offsets, sizes)) + "]"


def _signature(item: WriteItem) -> tuple[Any, ...]:
    td = item.tensor_data
    if td is None or item.type == WriteItemType.BYTE_IO:
        return ("object",)
    return ("tensor", td.properties.dtype, tuple(td.size))


def _describe(sig: tuple[Any, ...]) -> str:
    if sig[0] == "object":
        return "an object"
    return f"a {str(sig[1]).removeprefix('torch.')} tensor of global size {sig[2]}"


# ------------------------------------------------------------------ before dedup
def check_consistency(index: PlanIndex, all_plans: Sequence[SavePlan]) -> None:
    """Every holder of a replicated key agrees on kind, dtype and global size.

    Only keys with several holders are compared, and only on one rank per
    distinct plan digest (the digest covers kind, dtype and size, so ranks
    sharing it agree). Tensors of one fqn held as different chunks are compared
    by the metadata build, which sees every chunk.

    :raises PlanValidationError: naming the key, the ranks and what each has.
    """
    import numpy as np

    _check_kinds(index)
    holders = index.holders
    first = index.first
    multi = np.fromiter(map(len, holders), dtype=np.int64, count=len(holders)) > 1
    if not multi.any():
        return
    bad: dict[int, dict[int, tuple[Any, ...]]] = {}
    for rep in index.members():
        ids = index.plan_ids(rep)
        pos = np.flatnonzero(multi[ids]).tolist() if len(ids) else []
        items = all_plans[rep].items
        mine = items if len(pos) == len(items) else list(map(items.__getitem__, pos))
        if all(map(operator.is_, mine, map(first.__getitem__, ids[pos].tolist()))):
            continue  # this plan's copies are the index's own items (its lowest holder)
        for p in pos:
            item = items[p]
            k = int(ids[p])
            ref = first[k]
            if item is ref:
                continue
            sig = _signature(item)
            if sig != _signature(ref):
                bad.setdefault(k, {holders[k][0]: _signature(ref)})[rep] = sig
    if not bad:
        return
    errors = []
    for k in sorted(bad)[:20]:
        fqn, off = index.keys[k].fqn, index.keys[k].offset
        parts = []
        for sig, ranks in _signatures_by_rank(index, all_plans, k).items():
            parts.append(f"rank{'s' if len(ranks) > 1 else ''} {_ranks(ranks)} {'have' if len(ranks) > 1 else 'has'} "
                         f"{_describe(sig)}")
        where = _where(fqn, off if off is not None and any(off) else None)
        errors.append(
            f"ranks disagree on key {where}: " + "; ".join(parts)
            + " (every rank must save the same kind, dtype and global size for a replicated key: "
            "check the model/optimizer construction on those ranks)"
        )
    raise PlanValidationError(errors)


def _signatures_by_rank(index: PlanIndex, all_plans: Sequence[SavePlan], k: int) -> dict[Any, list[int]]:
    """What each holder of key ``k`` has (an error path)."""
    held = set(index.holders[k])
    out: dict[Any, list[int]] = {}
    for rep, ranks in index.members().items():
        mine = [r for r in ranks if r in held]
        if not mine:
            continue
        pos = list(index.ids[rep]).index(k)
        out.setdefault(_signature(all_plans[rep].items[pos]), []).extend(mine)
    return {sig: sorted(rs) for sig, rs in sorted(out.items(), key=lambda t: min(t[1]))}


_FQN = operator.attrgetter("fqn")


def _check_kinds(index: PlanIndex) -> None:
    """No fqn is an object (a key without offset) on some ranks and a tensor on others."""
    import itertools

    keys = index.keys
    # the index's (fqn, offset) keys: plain tuples, read faster than the MetadataIndex objects
    pairs = index.lookup.keys()
    is_obj = list(map(operator.is_, map(operator.itemgetter(1), pairs), itertools.repeat(None)))
    objects = set(map(operator.itemgetter(0), itertools.compress(pairs, is_obj)))
    if not objects or len(objects) == len(pairs):
        return
    clash = sorted(objects.intersection(
        map(operator.itemgetter(0), itertools.compress(pairs, map(operator.not_, is_obj)))))
    if not clash:
        return
    errors = []
    for fqn in clash[:20]:
        obj_ranks: set[int] = set()
        tensor_ranks: set[int] = set()
        for k, key in enumerate(keys):
            if key.fqn == fqn:
                (obj_ranks if key.offset is None else tensor_ranks).update(index.holders[k])
        errors.append(
            f"ranks disagree on key {fqn!r}: ranks {sorted(obj_ranks)} have an object, ranks "
            f"{sorted(tensor_ranks)} a tensor (every rank must save the same kind of value under one key)"
        )
    raise PlanValidationError(errors)


def _ranks(ranks: Sequence[int]) -> str:
    if len(ranks) > 6:
        return f"{list(ranks[:6])[:-1]}... ({len(ranks)} ranks)".replace("]...", ", ...]")
    return str(list(ranks))


# ------------------------------------------------------------------ after dedup
def find_violations(
    index: PlanIndex, deduped: Sequence[SavePlan], keep: int = SHOWN, *, fast: bool = True
) -> Violations:
    """Every way ``deduped`` breaks the strategy contract with respect to ``index`` (see module doc).

    ``fast=False`` takes the exact per-item path for every item that is not a
    held item object written whole (the fast paths only decide the items that
    certainly pass and must not change any verdict or message: the tests compare both).

    All ranks' outputs are checked at once: one C-level key lookup per written
    item, and one numpy search of (distinct plan, key) pairs for the holders.
    """
    import itertools

    import numpy as np

    out = Violations(keep)
    n = len(index)
    world = index.world_size
    if len(deduped) > world:
        out.add(f"the strategy returned {len(deduped)} plans for {world} ranks")
        deduped = deduped[:world]
    counts = list(map(len, map(_ITEMS, deduped)))
    items = list(itertools.chain.from_iterable(map(_ITEMS, deduped)))
    # Items that are the held item objects themselves (index.first) are written whole, as held: found
    # by identity with a map local to this call (the objects stay alive in the index meanwhile). Only
    # the others take the (fqn, offset) lookup and a comparison with the held item.
    first = index.first
    by_id = dict(zip(map(id, first), range(n)))
    ids: list[Any] = list(map(by_id.get, map(id, items))) if fast else [None] * len(items)
    slices = _Slices([], np.zeros(0, dtype=np.int64), [], {})
    ranks = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
    if None in ids:
        known = list(map(operator.is_not, ids, itertools.repeat(None)))
        odd = list(itertools.compress(range(len(items)), map(operator.not_, known)))
        # the fields of the other items, read once for the lookup, the whole-item test and the slice checks
        # (``None`` when some item lacks one: an object, or a tensor without a chunk)
        info: dict[int, tuple[Any, ...]] | None
        try:
            info = dict(zip(odd, map(_SLICE, map(items.__getitem__, odd))))
            looked = list(map(index.lookup.get, map(_FQN_OFFSET, info.values())))
        except AttributeError:
            info = None
            looked = list(map(index.lookup.get, map(_KEY, map(items.__getitem__, odd))))
        if len(odd) == len(items):
            ids = looked
        else:
            fill = dict(zip(odd, looked))
            ids = list(map(fill.get, range(len(items)), ids))  # the looked-up id at odd positions
        whole_pos = list(itertools.compress(range(len(items)), known))
        ranks_l = ranks.tolist()
        found: list[int] = []  # positions of items of a held key, written as another chunk
        unknown: list[int] = []  # positions of items whose key no rank holds: slices, or invented
        held: dict[int, tuple[Any, ...]] = {}  # key -> _TENSOR fields of its held item, once read
        if fast:
            whole_pos.extend(_whole_positions(items, ids, odd, first, found, unknown, ranks_l, out, held, info))
        else:
            unknown = list(itertools.compress(odd, map(operator.is_, map(ids.__getitem__, odd), itertools.repeat(None))))
            known_odd = list(itertools.compress(odd, map(operator.is_not, map(ids.__getitem__, odd),
                                                         itertools.repeat(None))))
            whole_pos.extend(_whole_slow(items, ids, known_odd, first, found, ranks_l, out))
        whole_pos.sort()
        spos = sorted(found + unknown) if found else unknown  # in output order
        slices = _Slices(list(map(items.__getitem__, spos)), ranks[np.asarray(spos, dtype=np.int64)],
                         list(map(ids.__getitem__, spos)), held,
                         None if info is None else list(map(info.__getitem__, spos)))
    else:
        whole_pos = list(range(len(items)))
    if len(whole_pos) == len(ids):
        wids = np.array(ids, dtype=np.int64)
        wranks = ranks
    else:
        wids = np.fromiter(map(ids.__getitem__, whole_pos), dtype=np.int64, count=len(whole_pos))
        wranks = ranks[np.asarray(whole_pos, dtype=np.int64)]
    _check_holders(index, wids, wranks, out)
    count = np.bincount(wids, minlength=n) if len(wids) else np.zeros(n, dtype=np.int64)
    sliced = _check_slices(index, slices, count, out, fast)
    _check_counts(index, deduped, count, sliced, out)
    return out


# Sort-based uniques: numpy 2.x's np.unique takes a hash path that is much slower on these small arrays.
def _unique(a: Any) -> Any:
    """The sorted distinct values of an int array."""
    import numpy as np

    s = np.sort(a)
    if len(s) < 2:
        return s
    keep = np.empty(len(s), dtype=bool)
    keep[0] = True
    np.not_equal(s[1:], s[:-1], out=keep[1:])
    return s[keep]


def _unique_starts(s: Any) -> tuple[Any, Any]:
    """For a *sorted* int array: its distinct values and the index of each one's first occurrence."""
    import numpy as np

    keep = np.ones(len(s), dtype=bool)
    if len(s) > 1:
        np.not_equal(s[1:], s[:-1], out=keep[1:])
    starts = np.flatnonzero(keep)
    return s[starts], starts


def _unique_inverse(a: Any) -> tuple[Any, Any]:
    """The sorted distinct values of an int array and, per element, the index of its value among them."""
    import numpy as np

    order = np.argsort(a, kind="stable")
    u, starts = _unique_starts(a[order])
    group = np.zeros(len(a), dtype=np.int64)
    if len(a):
        mark = np.zeros(len(a), dtype=np.int64)
        mark[starts[1:]] = 1
        group[order] = np.cumsum(mark)
    return u, group


def _check_holders(index: PlanIndex, wids: Any, wranks: Any, out: Violations) -> None:
    """Each (rank, key) written is held: a search in the sorted (distinct plan, key) pairs."""
    import numpy as np

    if not len(wids):
        return
    n = max(len(index), 1)
    members = index.members()
    rep_of = np.zeros(index.world_size, dtype=np.int64)
    for rep, ranks in members.items():
        rep_of[list(ranks)] = rep
    held = _unique(np.concatenate([rep * n + index.plan_ids(rep) for rep in members] or [np.zeros(0, np.int64)]))
    query = rep_of[wranks] * n + wids
    at = np.searchsorted(held, query)
    ok = (at < len(held)) & (held[np.minimum(at, max(len(held) - 1, 0))] == query) if len(held) else query < 0
    if ok.all():
        return
    for j in np.flatnonzero(~ok).tolist():
        if out.full:
            out.total += 1
            continue
        k, rank = int(wids[j]), int(wranks[j])
        out.add(f"rank {rank} writes {_key_text(index, k)}, which it does not hold "
                f"(holders: ranks {_ranks(index.holders[k])})")


_TENSOR = operator.attrgetter(
    "tensor_data.chunk.offsets", "tensor_data.chunk.sizes", "tensor_data.properties.dtype", "tensor_data.size"
)


def _whole_positions(
    items: Sequence[WriteItem],
    ids: list[Any],
    where: list[int],
    first: Sequence[WriteItem],
    found: list[Any],
    unknown: list[int],
    ranks: Sequence[int],
    out: Violations,
    held_fields: dict[int, tuple[Any, ...]],
    info: dict[int, tuple[Any, ...]] | None = None,
    block: int = 4096,
) -> list[int]:
    """Which of the positions ``where`` (ascending) hold items written whole. Items of a held key that
    are written as another chunk go to ``found`` (their positions; other differences are reported);
    the positions of items whose key no rank holds go to ``unknown`` (ascending).
    The fields read from held items go to ``held_fields`` (key -> :data:`_TENSOR` fields); ``info``
    has the :data:`_SLICE` fields of the items at ``where`` when all have them.

    Tensor items whose chunk, dtype and size equal the held item's (the common
    case) are decided in blocks with C-level maps, without a Python call per
    item; only the others (split slices, violations) take the per-item path.
    """
    keep: list[int] = []
    odd: list[int] = []
    for start in range(0, len(where), block):
        pos = where[start : start + block]
        sids = list(map(ids.__getitem__, pos))
        if None in sids:  # keys no rank holds (split slices past the first, invented items)
            known = list(map(operator.is_not, sids, itertools.repeat(None)))
            unknown.extend(itertools.compress(pos, map(operator.not_, known)))
            pos = list(itertools.compress(pos, known))
            sids = list(itertools.compress(sids, known))
        if not pos:
            continue
        seg = list(map(items.__getitem__, pos))
        refs = list(map(first.__getitem__, sids))
        try:
            mine = list(map(_TENSOR_OF_SLICE, map(info.__getitem__, pos))) if info is not None else list(
                map(_TENSOR, seg))
            held = list(map(_TENSOR, refs))
        except AttributeError:  # object items, or a tensor item without a chunk
            odd.extend(pos)
            continue
        held_fields.update(zip(sids, held))
        same = list(map(operator.eq, mine, held))
        keep.extend(itertools.compress(pos, same))
        ns = list(itertools.compress(pos, map(operator.not_, same)))
        if ns:
            # another chunk (offsets and sizes as tuples, e.g. torch.Size): a slice; anything else
            # (same chunk with another dtype or size, offsets as lists) is decided by the per-item path
            a = list(itertools.compress(mine, map(operator.not_, same)))
            b = list(itertools.compress(held, map(operator.not_, same)))
            cols = [list(map(operator.itemgetter(c), x)) for x in (a, b) for c in (0, 1)]
            tup = map(all, zip(*(map(isinstance, col, itertools.repeat(tuple)) for col in cols)))
            moved = list(map(operator.and_, tup, map(operator.or_, map(operator.ne, cols[0], cols[2]),
                                                   map(operator.ne, cols[1], cols[3]))))
            found.extend(itertools.compress(ns, moved))
            odd.extend(itertools.compress(ns, map(operator.not_, moved)))
    if odd:
        odd.sort()
        keep.extend(_whole_slow(items, ids, odd, first, found, ranks, out))
        keep.sort()
    return keep


def _whole_slow(
    items: Sequence[WriteItem], ids: list[Any], odd: list[int], first: Sequence[WriteItem], found: list[Any],
    ranks: Sequence[int], out: Violations,
) -> list[int]:
    keep: list[int] = []
    for p in odd:
        item, k = items[p], ids[p]
        ref = first[k]
        if item is ref:
            keep.append(p)
            continue
        td, rtd = item.tensor_data, ref.tensor_data
        if (td is None) != (rtd is None):
            out.add(f"rank {ranks[p]} writes {_where(item.index.fqn, None)} as "
                    f"{'an object' if td is None else 'a tensor'}; it is held as "
                    f"{'an object' if rtd is None else 'a tensor'}")
            continue
        if td is None:
            keep.append(p)
            continue
        if td.chunk is None or tuple(td.chunk.sizes) != tuple(rtd.chunk.sizes) or (
            tuple(td.chunk.offsets) != tuple(rtd.chunk.offsets)
        ):
            found.append(p)
            continue
        if td.properties.dtype != rtd.properties.dtype or tuple(td.size) != tuple(rtd.size):
            out.add(f"rank {ranks[p]} writes {_where(item.index.fqn, None)} as {_describe(_signature(item))}; "
                    f"it is held as {_describe(_signature(ref))}")
            continue
        keep.append(p)
    return keep


def _key_text(index: PlanIndex, k: int) -> str:
    key = index.keys[k]
    ref = index.first[k]
    td = ref.tensor_data
    if td is None or td.chunk is None:
        return _where(key.fqn, None)
    if tuple(td.chunk.sizes) == tuple(td.size):
        return _where(key.fqn, None)
    return _where(key.fqn, td.chunk.offsets, td.chunk.sizes)


def _inside(outer: Any, inner: tuple[Any, Any]) -> bool:
    oo, os_ = tuple(outer.offsets), tuple(outer.sizes)
    io, is_ = inner
    return len(oo) == len(io) == len(is_) and all(
        a <= b and b + s <= a + t for a, t, b, s in zip(oo, os_, io, is_)
    )


class _Slices:
    """The written items that are not held items written whole, in output order: each one's item, rank
    (an array) and candidate key (the held key with the same fqn and offset, or ``None``); and the
    held items' fields already read, so that no held item is read twice."""

    __slots__ = ("items", "ranks", "cands", "held", "info")

    def __init__(
        self, items: list[WriteItem], ranks: Any, cands: list[int | None], held: dict[int, tuple[Any, ...]],
        info: list[tuple[Any, ...]] | None = None,
    ) -> None:
        self.items, self.ranks, self.cands = items, ranks, cands
        self.info = info  # the items' _SLICE fields, when already read
        self.held = held  # key -> _TENSOR fields of its held item, for those already read


def _check_slices(index: PlanIndex, slices: _Slices, count: Any, out: Violations, fast_path: bool = True) -> set[int]:
    """Slices: inside a chunk their rank holds, index offset = chunk offset, tiling it exactly.

    The slices that certainly pass the per-slice checks (the usual split slices)
    are found with numpy (:func:`_fast_containers`) and their tiling checked per
    held chunk as intervals along one dimension (:func:`_fast_tilings`); every
    other slice or chunk takes the exact per-item path, which also words the
    violations, so messages and their order do not depend on the fast path.
    """
    if not slices.items:
        return set()
    import numpy as np

    if fast_path:
        fast, arrays = _fast_containers(index, slices)
    else:
        fast, arrays = np.full(len(slices.items), -1, dtype=np.int64), None
    by_fqn: dict[str, list[int]] | None = None
    pieces: dict[int, list[int]] = {}
    chunks: dict[int, tuple[Any, Any]] = {}  # slow-path slices: position -> (offsets, sizes) tuples
    holders, first = index.holders, index.first
    if (fast >= 0).all() and arrays is not None:
        # every slice certainly passes its own checks: only the chunks whose tiling is not certain are
        # grouped (in order of their first slice) for the exact check
        order = np.argsort(fast, kind="stable")
        ks, starts = _unique_starts(fast[order])
        tiled = _fast_tilings(index, {}, fast, arrays, count)
        sure = np.zeros(len(index), dtype=bool)
        sure[list(tiled)] = True
        rest = np.flatnonzero(~sure[ks])
        if len(rest):
            ends = np.append(starts[1:], len(order))
            ol = order.tolist()
            for g in rest[np.argsort(order[starts[rest]], kind="stable")].tolist():
                pieces[int(ks[g])] = ol[int(starts[g]) : int(ends[g])]
            _tilings_slow(index, pieces, slices, {}, count, out)
        return set(ks.tolist())
    todo = enumerate(zip(slices.ranks.tolist(), slices.items, slices.cands))
    for j, (rank, item, cand) in todo:
        k = int(fast[j])
        if k >= 0:
            pieces.setdefault(k, []).append(j)
            continue
        fqn = item.index.fqn
        td = item.tensor_data
        if td is None or td.chunk is None:
            out.add(f"rank {rank} writes {_where(fqn, item.index.offset)}, which no rank holds in that form")
            continue
        ch = (tuple(td.chunk.offsets), tuple(td.chunk.sizes))
        off = item.index.offset
        if off is None or tuple(off) != ch[0]:
            out.add(f"rank {rank} writes {_where(fqn, *ch)} with MetadataIndex.offset "
                    f"{None if off is None else tuple(off)}, not its chunk offset {ch[0]}: a load would fail "
                    "with KeyError (the index offset must equal the chunk offset)")
            continue
        chunks[j] = ch
        if cand is not None and _holds(holders[cand], rank) and _held_chunk_contains(first[cand], ch):
            pieces.setdefault(cand, []).append(j)  # the usual split slice: its first piece
            continue
        if by_fqn is None:
            by_fqn = _keys_by_fqn(index, {it.index.fqn for it in slices.items})
        if fqn not in by_fqn:
            out.add(f"rank {rank} writes {fqn!r}, which no rank holds (a strategy must not invent items)")
            continue
        container = [k for k in by_fqn[fqn] if _held_chunk_contains(first[k], ch)]
        mine = [k for k in container if _holds(holders[k], rank)]
        if not mine:
            if container:
                k = container[0]
                out.add(f"rank {rank} writes {_where(fqn, *ch)}, part of {_key_text(index, k)}, which it does "
                        f"not hold (holders: ranks {_ranks(holders[k])})")
            else:
                out.add(f"rank {rank} writes {_where(fqn, *ch)}, which lies outside every chunk of {fqn!r} "
                        "that any rank holds")
            continue
        pieces.setdefault(mine[0], []).append(j)
    tiled = _fast_tilings(index, pieces, fast, arrays, count) if arrays is not None else set()
    _tilings_slow(index, {k: got for k, got in pieces.items() if k not in tiled}, slices, chunks, count, out)
    return set(pieces)


def _tilings_slow(
    index: PlanIndex, pieces: dict[int, list[int]], slices: _Slices, chunks: dict[int, tuple[Any, Any]],
    count: Any, out: Violations,
) -> None:
    """The exact tiling check (:func:`_check_tiling`) of each chunk in ``pieces``, in their order."""
    for k, got in pieces.items():
        full = []
        for j in got:
            if j in chunks:
                ch = chunks[j]
            else:  # a fast-path slice: a tensor item with a chunk
                c = slices.items[j].tensor_data.chunk  # type: ignore[union-attr]
                ch = (tuple(c.offsets), tuple(c.sizes))  # type: ignore[union-attr]
            full.append((int(slices.ranks[j]), ch, slices.items[j].tensor_data))
        _check_tiling(index, k, full, int(count[k]), out)


def _holds(holders: Sequence[int], rank: int) -> bool:
    """``rank in holders`` for an ascending tuple, in O(log n)."""
    at = bisect_right(holders, rank) - 1
    return at >= 0 and holders[at] == rank


_SLICE = operator.attrgetter(
    "index.fqn", "index.offset", "tensor_data.chunk.offsets", "tensor_data.chunk.sizes",
    "tensor_data.properties.dtype", "tensor_data.size",
)
_ITEMS = operator.attrgetter("items")
_FQN_OFFSET = operator.itemgetter(0, 1)  # of _SLICE fields: the index key
_TENSOR_OF_SLICE = operator.itemgetter(2, 3, 4, 5)  # of _SLICE fields: the _TENSOR fields


class _SliceArrays:
    """The slices' geometry as numpy arrays, one group per number of dimensions."""

    __slots__ = ("groups", "sig_ok")

    def __init__(self, groups: dict[int, tuple[Any, ...]], sig_ok: Any) -> None:
        # ndim -> (slice positions, offsets (m, ndim), sizes (m, ndim), their chunks' keys (sorted, unique),
        # those chunks' offsets and sizes)
        self.groups = groups
        self.sig_ok = sig_ok  # per slice: dtype and global size equal the container's (fast slices only)


def _fast_containers(index: PlanIndex, slices: _Slices) -> tuple[Any, _SliceArrays | None]:
    """Per slice, the held chunk (key id) it belongs to when it certainly passes the per-slice checks, else -1.

    Certainly passes: a tensor slice whose index offset equals its chunk offset
    (``==`` on the offsets as given), whose rank holds exactly one chunk of its
    fqn, and that chunk contains it. Found with numpy: the fqns of the held
    keys are coded once, each involved distinct plan's ids are filtered by code,
    and containment is one comparison of (slices x dims) arrays.
    """
    import numpy as np

    items = slices.items
    n = len(items)
    fast = np.full(n, -1, dtype=np.int64)
    try:
        info = slices.info if slices.info is not None else list(map(_SLICE, items))
    except AttributeError:  # an object slice or a tensor without a chunk: a violation, worded by the slow path
        return fast, None
    fqns, ioffs, coffs, csizes, dtypes, gsizes = zip(*info)
    off_ok = list(map(operator.eq, ioffs, coffs))
    code: dict[str, int] = {f: c for c, f in enumerate(dict.fromkeys(fqns))}
    ncode = len(code)
    keys = index.keys
    # each held key's fqn code (-1: no slice has its fqn), from the index's (fqn, offset) -> key map
    key_code = np.full(len(keys), -1, dtype=np.int64)
    lookup = index.lookup
    key_code[np.fromiter(lookup.values(), dtype=np.int64, count=len(lookup))] = np.fromiter(
        map(code.get, map(operator.itemgetter(0), lookup), itertools.repeat(-1)), dtype=np.int64, count=len(lookup))
    members = index.members()
    rep_of = np.zeros(index.world_size, dtype=np.int64)
    for rep, ranks in members.items():
        rep_of[list(ranks)] = rep
    ranks_arr = slices.ranks
    if len(ranks_arr) and (ranks_arr.min() < 0 or ranks_arr.max() >= index.world_size):
        return fast, None
    s_rep = rep_of[ranks_arr]
    s_pair = s_rep * ncode + np.fromiter(map(code.__getitem__, fqns), dtype=np.int64, count=n)
    # (distinct plan, fqn) -> the keys of that fqn the plan holds
    pair_parts, key_parts = [], []
    for rep in _unique(s_rep).tolist():
        ids = index.plan_ids(rep)
        c = key_code[ids]
        m = c >= 0
        pair_parts.append(rep * ncode + c[m])
        key_parts.append(ids[m])
    if not pair_parts:
        return fast, None
    pk = _unique(np.concatenate(pair_parts) * max(len(keys), 1) + np.concatenate(key_parts))
    if not len(pk):  # no involved plan holds any of the slices' fqns: all violations
        return fast, None
    pairs, pkeys = pk // max(len(keys), 1), pk % max(len(keys), 1)
    upairs, start = _unique_starts(pairs)  # pairs is sorted: start is the index of each pair's first
    cnt = np.diff(np.append(start, len(pairs)))
    at = np.searchsorted(upairs, s_pair)
    at_c = np.minimum(at, max(len(upairs) - 1, 0))
    found = (at < len(upairs)) & (upairs[at_c] == s_pair) & (cnt[at_c] == 1)
    cont = np.where(found, pkeys[start[at_c]], -1)
    ndims = np.fromiter(map(len, coffs), dtype=np.int64, count=n)
    nsz = np.fromiter(map(len, csizes), dtype=np.int64, count=n)
    ok = found & np.asarray(off_ok, dtype=bool) & (ndims == nsz)
    groups: dict[int, tuple[Any, ...]] = {}
    first = index.first
    sig_ok = np.zeros(n, dtype=bool)
    for d in _unique(ndims[ok]).tolist():
        pos = np.flatnonzero(ok & (ndims == d))
        pl = pos.tolist()
        o = _rows(map(coffs.__getitem__, pl), len(pl), d)
        s = _rows(map(csizes.__getitem__, pl), len(pl), d)
        ks = cont[pos]
        uk, inv = _unique_inverse(ks)
        ukl = uk.tolist()
        ko, ksz, good, rsig = _held_chunks(first, ukl, d, slices.held)
        sel = good[inv] & (ko[inv] <= o).all(axis=1) & (o + s <= ko[inv] + ksz[inv]).all(axis=1)
        fast[pos[sel]] = ks[sel]
        groups[d] = (pos[sel], o[sel], s[sel], uk, ko, ksz)
        # dtype and global size: each slice's against its chunk's (read once per chunk)
        if rsig is not None:
            held_at = list(map(rsig.__getitem__, inv.tolist()))
            same = np.fromiter(  # dtypes are singletons: identity is equality
                map(operator.is_, map(dtypes.__getitem__, pl), map(operator.itemgetter(0), held_at)),
                dtype=bool, count=len(pl))
            same &= np.fromiter(map(operator.eq, map(gsizes.__getitem__, pl), map(operator.itemgetter(1), held_at)),
                                dtype=bool, count=len(pl))
            sig_ok[pos] = same & sel
    return fast, _SliceArrays(groups, sig_ok)


def _held_chunks(
    first: Sequence[WriteItem], ks: list[int], d: int, known: dict[int, tuple[Any, ...]]
) -> tuple[Any, Any, Any, list[Any] | None]:
    """The held chunks of keys ``ks`` as (offsets, sizes) arrays of ``d`` columns, which are usable
    (a tensor item with a chunk of ``d`` dimensions) and, when all are, each one's (dtype, global size).

    ``known`` holds the :data:`_TENSOR` fields of held items already read (by :func:`_whole_positions`);
    the others are read here and added.
    """
    import numpy as np

    try:
        missing = list(itertools.filterfalse(known.__contains__, ks))
        if missing:
            known.update(zip(missing, map(_TENSOR, map(first.__getitem__, missing))))
        held = list(map(known.__getitem__, ks))
        offs, sizes = list(map(operator.itemgetter(0), held)), list(map(operator.itemgetter(1), held))
        if set(map(len, offs)) | set(map(len, sizes)) <= {d}:
            return (_rows(offs, len(ks), d), _rows(sizes, len(ks), d), np.ones(len(ks), dtype=bool),
                    list(map(operator.itemgetter(2, 3), held)))
    except AttributeError:  # an object, or a tensor item without a chunk
        pass
    ko = np.zeros((len(ks), d), dtype=np.int64)
    ksz = np.zeros((len(ks), d), dtype=np.int64)
    good = np.zeros(len(ks), dtype=bool)
    for u, k in enumerate(ks):
        td = first[k].tensor_data
        if td is not None and td.chunk is not None and len(td.chunk.offsets) == d and len(td.chunk.sizes) == d:
            ko[u], ksz[u], good[u] = tuple(td.chunk.offsets), tuple(td.chunk.sizes), True
    return ko, ksz, good, None


def _rows(rows: Any, n: int, d: int) -> Any:
    """``n`` sequences of ``d`` ints as an (n, d) int64 array (one C-level pass)."""
    import numpy as np

    return np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64, count=n * d).reshape(n, d)


def _fast_tilings(
    index: PlanIndex, pieces: dict[int, list[int]], fast: Any, arrays: _SliceArrays, count: Any
) -> set[int]:
    """The held chunks whose slices certainly tile them exactly (the rest take :func:`_check_tiling`).

    Certainly: every slice came through the fast path, none changes dtype or
    global size, the chunk is not also written whole, and the slices differ from
    the chunk along one dimension only, where sorted by start they are
    non-empty, do not overlap and their lengths add up to the chunk's.
    """
    import numpy as np

    # a chunk is a candidate when all its slices came through the fast path with the right dtype and size
    # (slow-path slices have fast == -1) and it is not also written whole
    nslow = np.zeros(len(index), dtype=np.int64)
    slow_keys = [k for k, js in pieces.items() for j in js if fast[j] < 0] if (fast < 0).any() else []
    if slow_keys:
        np.add.at(nslow, slow_keys, 1)
    fk = fast[fast >= 0]
    bad = np.zeros(len(index), dtype=bool)
    bad[fk[~arrays.sig_ok[fast >= 0]]] = True
    want = np.zeros(len(index), dtype=bool)
    want[fk] = True
    want &= ~bad & (nslow == 0) & (np.asarray(count) == 0)
    if not want.any():
        return set()
    ok_keys: set[int] = set()
    for d, (pos, o, s, gk, gko, gksz) in arrays.groups.items():
        if not len(pos):
            continue
        ks = fast[pos]
        m = want[ks]
        if not m.any():
            continue
        ks, o, s = ks[m], o[m], s[m]
        uk, inv = _unique_inverse(ks)
        row = np.searchsorted(gk, uk)  # the chunks as the fast path read them
        ko, ksz = gko[row], gksz[row]
        differ = (o != ko[inv]) | (s != ksz[inv])  # (slices, dims)
        nu = len(uk)
        # per chunk and dimension: does any slice differ there (bincount: ufunc.at is slow)
        vary = np.stack([np.bincount(inv, weights=differ[:, c], minlength=nu) > 0 for c in range(d)], axis=1) \
            if d else np.zeros((nu, 0), dtype=bool)
        nvary = vary.sum(axis=1)
        dim = vary.argmax(axis=1) if d else np.zeros(nu, dtype=np.int64)
        bad = nvary != 1
        bad |= np.bincount(inv, weights=(s <= 0).any(axis=1), minlength=nu) > 0  # an empty slice
        sd = dim[inv]
        rows = np.arange(len(inv))
        lo = o[rows, sd]
        ln = s[rows, sd]
        order = np.lexsort((lo, inv))
        g, lo, ln = inv[order], lo[order], ln[order]
        if len(g) > 1:
            same = g[1:] == g[:-1]
            overlap = same & (lo[1:] < lo[:-1] + ln[:-1])
            bad[g[1:][overlap]] = True
        total = np.bincount(g, weights=ln, minlength=nu)  # float64: exact below 2**53 elements
        bad |= total != ksz[np.arange(nu), dim]
        ok_keys.update(uk[~bad].tolist())
    # every slice of a candidate came through the fast path, so it has the chunk's dimensions: one group
    return ok_keys


def _held_chunk_contains(held: WriteItem, ch: tuple[Any, Any]) -> bool:
    td = held.tensor_data
    return td is not None and td.chunk is not None and _inside(td.chunk, ch)


def _keys_by_fqn(index: PlanIndex, wanted: set[str]) -> dict[str, list[int]]:
    fqns = list(map(_FQN, index.keys))
    out: dict[str, list[int]] = {}
    for k in itertools.compress(range(len(fqns)), map(wanted.__contains__, fqns)):
        out.setdefault(fqns[k], []).append(k)
    return out


def _check_tiling(index: PlanIndex, k: int, got: list[Any], whole: int, out: Violations) -> None:
    from dcplan.compat import ChunkStorageMetadata
    from dcplan.save.validate import _overlaps

    ref = index.first[k].tensor_data
    assert ref is not None and ref.chunk is not None  # a slice's container is a chunked tensor item
    what = _key_text(index, k)
    if whole:
        out.add(f"{what} is written whole and also as {len(got)} slice(s): its elements are written twice")
        return
    if any(td.properties.dtype != ref.properties.dtype or tuple(td.size) != tuple(ref.size) for _, _, td in got):
        out.add(f"slices of {what} change its dtype or global size")
        return
    chunks = [ChunkStorageMetadata(offsets=o, sizes=s) for _, (o, s), _ in got]
    overlaps = _overlaps(index.keys[k].fqn, chunks, tuple(ref.size))
    if overlaps:
        fqn = index.keys[k].fqn
        shown = ", ".join(f"{_where(fqn, o, s)} (rank {r})" for r, (o, s), _ in got[:4])
        out.add(f"the slices of {what} overlap, so some elements are written twice: {shown}"
                + (f" and {len(got) - 4} more" if len(got) > 4 else ""))
        return
    volume = sum(math.prod(s) for _, (_, s), _ in got)
    total = math.prod(ref.chunk.sizes)
    if volume != total:
        out.add(f"the slices of {what} cover {volume} of its {total} elements (slices must tile the held chunk "
                "exactly)")


def _writers(index: PlanIndex, deduped: Sequence[SavePlan], ks: Sequence[int]) -> dict[int, list[int]]:
    """Which ranks write each key of ``ks`` whole (an error path: one pass over the output)."""
    want = {index.keys[k].fqn for k in ks}
    found: dict[int, list[int]] = {k: [] for k in ks}
    for rank, plan in enumerate(deduped):
        for item in plan.items:
            if item.index.fqn in want:
                k = index.lookup.get(_KEY(item))
                if k in found:
                    found[k].append(rank)
    return found


def _check_counts(
    index: PlanIndex, deduped: Sequence[SavePlan], count: Any, sliced: set[int], out: Violations
) -> None:
    import numpy as np

    if sliced:
        count = count.copy()
        count[list(sliced)] = 1
    dropped = np.flatnonzero(count == 0)
    for k in dropped[: out.keep].tolist():
        out.add(f"{_key_text(index, k)} is held by ranks {_ranks(index.holders[k])} but no rank writes it "
                "(dropped: the checkpoint would lack it)")
    out.total += max(0, len(dropped) - min(len(dropped), out.keep))
    twice = np.flatnonzero(count > 1)
    shown = twice[: out.keep].tolist()
    writers = _writers(index, deduped, shown) if shown else {}
    for k in shown:
        w = writers.get(k) or []
        by = " and ".join(f"rank {r}" for r in w[:2]) + (f" and {len(w) - 2} more" if len(w) > 2 else "")
        out.add(f"{_key_text(index, k)} is written by {by} ({int(count[k])} copies of one item)")
    out.total += max(0, len(twice) - min(len(twice), out.keep))


def verify_dedup(
    index: PlanIndex, deduped: Sequence[SavePlan], strategy: str, distribution: str | None = None
) -> None:
    """Raise :class:`StrategyError` when ``deduped`` breaks the strategy contract (see module doc)."""
    found = find_violations(index, deduped)
    if found:
        raise StrategyError(strategy, distribution, found.shown, found.total)
