"""Step 3 of a save, on the coordinator: the plan index (who holds what, and item bytes)."""

from __future__ import annotations

import itertools
import logging
import math
import operator
from collections.abc import Mapping, Sequence
from typing import Any

from dcplan.compat import (
    SavePlan,
    WriteItem,
    replace_plan,
)
from dcplan.save.bound import _bound
from dcplan.save.local import _ITEMSIZE, item_nbytes

log = logging.getLogger("dcplan")

#: the same function as :func:`dcplan.save.local.item_nbytes` (kept under its old name)
fast_nbytes = item_nbytes


_TD = operator.attrgetter("tensor_data")
_CHUNK_SIZES = operator.attrgetter("chunk.sizes")
_DTYPE = operator.attrgetter("properties.dtype")


def nbytes_list(items: Sequence[WriteItem], block: int = 4096) -> list[int]:
    """:func:`dcplan.save.local.item_nbytes` of every item, computed with C-level maps where possible.

    Blocks of tensor items with chunks (the common case) avoid a Python call
    per item; a block holding an object item falls back to ``item_nbytes``.
    """
    out: list[int] = []
    for start in range(0, len(items), block):
        seg = items[start : start + block]
        try:
            tds = list(map(_TD, seg))
            sizes = list(map(_CHUNK_SIZES, tds))
            dtypes = list(map(_DTYPE, tds))
        except AttributeError:  # an object item, or a tensor item without a chunk
            out.extend(map(item_nbytes, seg))
            continue
        for dtype in set(dtypes).difference(_ITEMSIZE):
            _ITEMSIZE[dtype] = int(dtype.itemsize)
        out.extend(map(operator.mul, map(math.prod, sizes), map(_ITEMSIZE.__getitem__, dtypes)))
    return out



class PlanIndex:
    """Who holds what, built in one pass over the local plans.

    Attributes (``k`` = key id, in first-seen order: rank 0's items in plan
    order, then new items of rank 1, ...):

    * ``keys[k]``: the item's ``MetadataIndex`` (fqn + offset; DCP's identity);
    * ``first[k]``: the item as the lowest holder lists it;
    * ``holders[k]``: the ranks holding it, a tuple, ascending, no duplicates;
    * ``nbytes[k]``: the bytes it writes;
    * ``ids[rank]``: the key id of each item of that rank's plan, in plan order
      (ranks with the same plan digest share one list: treat it as read-only);
    * ``lookup``: ``(fqn, offset) -> k`` (read-only);
    * :meth:`members`: each distinct plan's lowest rank -> the ranks sharing it.

    :param digests: optional, one per rank: a digest of that rank's item keys
        (:func:`dcplan.save.local.plan_digest`, computed by each rank on its own
        plan). Ranks whose digests are equal (and whose plans have the same
        length and the same first, middle and last keys) are indexed once: a
        DDP or HSDP save then costs the coordinator one pass over the distinct
        plans instead of over every entry. ``None`` entries are indexed alone.
    :param hosts: optional, one per rank: the host name the rank runs on
        (:attr:`dcplan.save.planner.RankPayload.host`); ranks sharing a host form
        a node (per-node report, ``balance = "node"``). Kept as ``hosts``.
    """

    __slots__ = (
        "world_size", "keys", "first", "holders", "ids", "lookup", "hosts", "_nbytes", "_members", "_flat", "_bounds",
        "_lower",
    )

    def __init__(
        self,
        all_plans: Sequence[SavePlan],
        digests: Sequence[Any] | None = None,
        hosts: Sequence[str | None] | None = None,
    ) -> None:
        # Keys are (fqn, offset) tuples: the same equality as MetadataIndex (which ignores
        # the index hint) but built and hashed in C. Entries whose key is already known
        # (every replica after the first) never run Python bytecode: the key lookup is a
        # C-level map, and the holder lists come from one stable numpy sort.
        lookup: dict[tuple[str, Any], int] = {}
        keys: list[Any] = []
        first: list[WriteItem] = []
        all_ids: list[list[int]] = []
        rep_of: list[int] = []  # rank -> the lowest rank whose id list it shares
        by_digest: dict[tuple[Any, int], int] = {}
        get = lookup.get
        for rank, plan in enumerate(all_plans):
            items = plan.items
            d = digests[rank] if digests is not None else None
            if d is not None:
                rep = by_digest.setdefault((d, len(items)), rank)
                if rep != rank and _same_ends(all_plans[rep].items, items):
                    all_ids.append(all_ids[rep])
                    rep_of.append(rep)
                    continue
            ks = list(map(_KEY, items))
            ids: list[Any] = list(map(get, ks))
            if None in ids:
                # New keys, all C-level when they are distinct within the plan (the usual case)
                mask = list(map(operator.is_, ids, itertools.repeat(None)))
                new_keys = list(itertools.compress(ks, mask))
                base = len(keys)
                lookup.update(zip(new_keys, range(base, base + len(new_keys))))
                if len(lookup) == base + len(new_keys):
                    new_items = list(itertools.compress(items, mask))
                    keys.extend(map(_INDEX, new_items))
                    first.extend(new_items)
                    ids = list(map(get, ks))
                else:  # a key twice in this plan: undo, and go one entry at a time
                    for key in new_keys:
                        lookup.pop(key, None)
            if None in ids:
                for pos, k in enumerate(ids):
                    if k is None:
                        key = ks[pos]
                        k = get(key)
                        if k is None:
                            k = len(keys)
                            lookup[key] = k
                            keys.append(items[pos].index)
                            first.append(items[pos])
                        ids[pos] = k
            all_ids.append(ids)
            rep_of.append(rank)
        self.world_size = len(all_plans)
        self.lookup = lookup
        self.hosts: tuple[str | None, ...] | None = tuple(hosts) if hosts is not None else None
        self.keys = keys
        self.first = first
        self.ids = all_ids
        # each distinct plan's lowest rank -> every rank sharing its id list (ascending)
        self._members: dict[int, list[int]] = {}
        for rank, rep in enumerate(rep_of):
            self._members.setdefault(rep, []).append(rank)
        self.holders, self._flat, self._bounds = _holders(all_ids, self._members, len(keys))
        self._nbytes: list[int] | None = None
        self._lower: tuple[int, str, int] | None = None

    @property
    def nbytes(self) -> list[int]:
        if self._nbytes is None:
            self._nbytes = nbytes_list(self.first)
        return self._nbytes

    def lower_bound(self) -> tuple[int, str, int]:
        """The busiest-rank lower bound of these plans, which term set it, and the divisible bound.

        :func:`dcplan.save.bound._bound` on ``(world_size, holders, nbytes)``, computed once per
        index (the strategy and the plan report both need it).
        """
        if self._lower is None:
            self._lower = _bound(self.world_size, self.holders, self.nbytes)
        return self._lower

    def __len__(self) -> int:
        return len(self.keys)

    def members(self) -> Mapping[int, Sequence[int]]:
        """Each distinct plan's lowest rank -> every rank sharing its id list (ascending)."""
        return self._members

    def plan_ids(self, rep: int) -> Any:
        """The key ids of distinct plan ``rep`` (a key of :meth:`members`), in plan order, as a numpy array."""
        return self._flat[self._bounds[rep] : self._bounds[rep + 1]]

    def fixed_loads(self) -> list[int]:
        """Per rank: bytes of the items only that rank holds."""
        fixed = [0] * self.world_size
        nb = self.nbytes
        for k, hs in enumerate(self.holders):
            if len(hs) == 1:
                fixed[hs[0]] += nb[k]
        return fixed

    def apply_owners(self, all_plans: Sequence[SavePlan], owner: Sequence[int]) -> list[SavePlan]:
        """New plans keeping, on each rank, the items whose ``owner[k]`` is that rank.

        Keys whose owner is not a holder (e.g. ``-1``) are dropped everywhere. One
        numpy pass per distinct plan; Python work only for the items kept.
        """
        import numpy as np

        own = np.asarray(owner, dtype=np.int64)
        keep: list[list[int]] = [[] for _ in all_plans]
        own_list: list[int] | None = None
        bounds = self._bounds
        for rep, ranks in self._members.items():
            lo_b, hi_b = bounds[rep], bounds[rep + 1]
            if hi_b - lo_b <= 8 and len(ranks) == 1:  # a tiny plan of its own (many-rank layouts): no numpy
                if own_list is None:
                    own_list = own.tolist()
                ids = self.ids[rep]
                keep[rep] = [p for p, k in enumerate(ids) if own_list[k] == rep]
                continue
            seg = self._flat[lo_b:hi_b]
            if not len(seg):
                continue
            who = own[seg]
            order = np.argsort(who, kind="stable")  # positions ascending within each owner
            sorted_who = who[order]
            cuts = np.searchsorted(sorted_who, ranks, side="left").tolist()
            ends = np.searchsorted(sorted_who, ranks, side="right").tolist()
            for r, lo, hi in zip(ranks, cuts, ends):
                if hi > lo:
                    keep[r] = order[lo:hi].tolist()
        out = []
        for plan, pos in zip(all_plans, keep):
            items = plan.items
            out.append(replace_plan(plan, items=list(map(items.__getitem__, pos))))
        return out


_KEY = operator.attrgetter("index.fqn", "index.offset")
_INDEX = operator.attrgetter("index")


def _same_ends(a: Sequence[WriteItem], b: Sequence[WriteItem]) -> bool:
    """A cheap guard on a digest match: the first, middle and last keys agree."""
    if len(a) != len(b):
        return False
    if not a:
        return True
    return all(_KEY(a[i]) == _KEY(b[i]) for i in {0, len(a) // 2, len(a) - 1})


def _holders(
    all_ids: Sequence[Sequence[int]], members: Mapping[int, Sequence[int]], n: int
) -> tuple[list[tuple[int, ...]], Any, list[int]]:
    """Per key id, the ranks whose id lists contain it (ascending, no duplicates).

    ``members`` maps each distinct plan's lowest rank to the ranks sharing its id
    list. Also returns the concatenated id lists of the distinct plans as one
    numpy array and each rank's start offset in it (only valid for the ranks
    that are keys of ``members``; ``bounds[r + 1]`` is the end).
    """
    import numpy as np

    world = len(all_ids)
    counts = [len(all_ids[r]) if r in members else 0 for r in range(world)]
    total = sum(counts)
    bounds = [0]
    for c in counts:
        bounds.append(bounds[-1] + c)
    flat = np.fromiter(
        itertools.chain.from_iterable(all_ids[r] for r in range(world) if r in members), dtype=np.int64, count=total
    )
    if total == 0 or n == 0:
        return [() for _ in range(n)], flat, bounds
    # (key, distinct plan) pairs, sorted by key; plans in ascending representative order
    plan_no = np.repeat(np.arange(world, dtype=np.int64), counts)
    order = np.argsort(flat, kind="stable")
    fk = flat[order]
    fp = plan_no[order]
    if total > 1:
        keep = np.empty(total, dtype=bool)
        keep[0] = True
        np.not_equal(fk[1:], fk[:-1], out=keep[1:])
        keep[1:] |= fp[1:] != fp[:-1]
        if not keep.all():
            fk = fk[keep]
            fp = fp[keep]
    kb = np.searchsorted(fk, np.arange(n + 1, dtype=np.int64)).tolist()
    pl = fp.tolist()
    if len(members) == world:  # no shared plans: the plan numbers are the ranks
        return [tuple(pl[kb[k] : kb[k + 1]]) for k in range(n)], flat, bounds
    group = {rep: tuple(ranks) for rep, ranks in members.items()}
    out: list[tuple[int, ...]] = []
    append = out.append
    for k in range(n):
        lo, hi = kb[k], kb[k + 1]
        if hi - lo == 1:
            append(group[pl[lo]])
        else:
            append(tuple(sorted(set(itertools.chain.from_iterable(group[p] for p in pl[lo:hi])))))
    return out, flat, bounds


def index_plans(
    all_plans: Sequence[SavePlan],
    digests: Sequence[Any] | None = None,
    hosts: Sequence[str | None] | None = None,
) -> PlanIndex:
    """Build a :class:`PlanIndex` of ``all_plans`` (one dict lookup per entry of each distinct plan).

    Nothing is remembered: :class:`dcplan.SavePlanner` builds the index once per
    save and passes it to the strategy (``index=``) and to the report. Call this
    only where no index was handed to you.

    :param digests: per rank, a digest of its plan's keys or ``None`` (see :class:`PlanIndex`).
    :param hosts: per rank, its host name or ``None`` (see :class:`PlanIndex`).
    """
    return PlanIndex(list(all_plans), digests, hosts)


def holders_and_sizes(
    all_plans: Sequence[SavePlan],
) -> tuple[dict[Any, tuple[int, ...]], dict[Any, int]]:
    """For each item key (``MetadataIndex``): the ranks holding it (sorted) and its bytes."""
    idx = index_plans(all_plans)
    nb = idx.nbytes
    return (
        {k: tuple(h) for k, h in zip(idx.keys, idx.holders)},
        dict(zip(idx.keys, nb)),
    )


