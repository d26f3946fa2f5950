"""Restricted assignment of replicated items: a portfolio of greedy orders, then local search.

The problem (``/work/shared/reference/peers.md`` section 5): every item ``k`` has
a size ``sizes[k]`` (bytes written) and a holder set ``holders[k]``; give each
item to one holder so that the busiest rank writes as little as possible.

:func:`solve` runs a small portfolio of greedy constructions, keeps the one
whose busiest rank is lightest (ties: in :data:`PREFERENCE` order), then
improves it by moves and swaps off the busiest rank:

1. ``torch`` (built last, only when the others are above the lower bound):
   torch's ``dedup_save_plans`` replayed exactly (items in
   first-seen order, weight = the global tensor bytes or 1, ties in the
   iteration order of the holder ``set`` torch builds), measured in bytes
   actually written. Only when ``torch_weights`` is given.
2. ``lpt``: plain LPT, every item (single-holder ones included) largest first
   (ties: first seen) to its least-loaded holder (ties: lowest rank).
3. ``lpt_fixed``: LPT with every rank's fixed load counted first.
4. ``fewest_holders``: fixed loads first, then fewest holders first, largest
   first (Megatron's "least flexible job first").
5. ``target``: fewest holders first, largest first, each item to the
   *fullest* holder it fits on under the lower bound (best fit), else to the
   least-loaded one. This finds packings no list order finds (issue 15's
   4-rank example: 25 MB where the orders above give 35 MB).
6. :data:`LPT_VARIANTS`: LPT and LPT with fixed loads first under other tie
   rules (equal sizes last seen first; holder ties to the highest rank or in
   torch's set order), ten greedy passes built one by one after the first
   local search, only while the result is more than 0.1 % above the lower
   bound (no LPT can go below it); one better than the result is improved by
   the local search too. On small integer layouts, where ties decide,
   they keep the result at or below every such LPT (0 losses in 60,000
   layouts against 12 variants; 8 losses without them).

Passes whose inputs are provably identical run once (the result is the same
as running each): with no single-holder item, "fixed loads first" starts from
the same zero loads in the same order, so ``lpt_fixed`` is ``lpt`` and each
``lpt_fixed_*`` variant is its ``lpt_*`` twin; with one holder count,
``fewest_holders`` orders items as ``lpt_fixed`` does. HSDP and DDP layouts are
both cases.

The local search then repeats: take the busiest rank ``b`` (ties: lowest);
move one of its items to another holder, or swap one of its items with a
smaller item of another rank, choosing the exchange that leaves both ranks
lowest, provided both end strictly below ``b``'s load. Each step lowers the
pair (busiest load, number of ranks at it), so it ends; it also stops at the
lower bound (optimal) or when its budget is spent: at most :data:`MAX_STEPS`
steps and ``WORK_PER_ITEM x (ranks + replicated items) + MIN_WORK`` items
examined, shared by all starts (so the search stays linear in the plan). No
wall-clock limit: the result depends only on the input.

Because the portfolio contains torch's greedy and LPT computed exactly as
they would be, and the local search never raises the busiest load, the result
is never worse than either. Everything is deterministic: lists and
insertion-ordered dicts, ties broken by rank or key id.
"""

from __future__ import annotations

import bisect
import heapq
import operator
from collections.abc import Callable, Sequence

import attrs
import numpy as np

__all__ = ["Solution", "solve", "greedy", "busiest", "PREFERENCE"]

#: the most local-search steps of one call (a step costs O(ranks + items of the busiest rank))
MAX_STEPS = 20_000
#: local-search work (items examined) per search: WORK_PER_ITEM x (ranks + replicated items) + MIN_WORK
WORK_PER_ITEM = 30
MIN_WORK = 200_000

#: portfolio entries, in the order that breaks ties between equally good ones
#: LPT tie-rule variants (item order for equal sizes, holder ties, fixed loads first or not), built
#: after the entries above only while none has reached the lower bound: name -> (order, tie, fixed first)
LPT_VARIANTS: dict[str, tuple[str, str, bool]] = {
    f"lpt{'_fixed' if ff else ''}_{order}_{tie}": (order, tie, ff)
    for ff in (False, True)
    for order in ("first", "last")
    for tie in ("low", "high", "torch")
    if (order, tie) != ("first", "low")  # that one is ``lpt`` / ``lpt_fixed``
}
#: the variants are skipped once the result is within 1 / VARIANT_SLACK of the lower bound (0.1 %)
VARIANT_SLACK = 1000
PREFERENCE = ("fixed", "fewest_holders", "lpt_fixed", "lpt", "target", *LPT_VARIANTS, "torch")


@attrs.frozen
class Solution:
    """An assignment: ``owner[k]`` per item, the loads it gives and where it came from."""

    owner: list[int]
    loads: list[int]
    busiest: int
    start: str  # the portfolio entry the local search started from
    candidates: dict[str, int]  # portfolio entry -> its busiest load (before local search)
    moves: int = 0


def busiest(loads: Sequence[int]) -> int:
    return max(loads, default=0)


def group_ids(holders: Sequence[Sequence[int]]) -> tuple[list[int], list[tuple[int, ...]]]:
    """Per key, the number of its holder set (first-seen order), and the sets.

    Hashing a holder tuple costs its length; keys sharing one tuple object (as
    the plan index makes them) are hashed once (a call-local lookup by object,
    the objects being alive for the whole call).
    """
    ids: dict[tuple[int, ...], int] = {}
    by_obj: dict[int, int] = {}
    out: list[int] = []
    for hs in holders:
        g = by_obj.get(id(hs))
        if g is None:
            g = by_obj[id(hs)] = ids.setdefault(tuple(hs), len(ids))
        out.append(g)
    return out, list(ids)


def greedy(
    world: int,
    holders: Sequence[Sequence[int]],
    order: Sequence[int],
    weight: Sequence[int],
    load: list[int],
    owner: list[int],
    torch_ties: bool = False,
    gid: Sequence[int] | None = None,
    high: bool = False,
    stop_at: int | None = None,
) -> bool:
    """Give each key of ``order`` to its least-loaded holder, by ``weight`` (updates ``load``/``owner``).

    Ties go to the lowest rank, or with ``torch_ties`` to the first in the
    iteration order of the ``set`` torch builds (ranks added in ascending
    order; ``set(tuple)`` inserts in the same order, so the running
    interpreter reproduces torch's ``min(set, key=load)`` exactly).
    With ``high``, ties go to the highest rank instead. With ``stop_at``, it gives up
    (returns ``False``) as soon as a load reaches it: loads only grow, so that
    assignment cannot end below ``stop_at``.
    ``gid``: :func:`group_ids` of ``holders`` (computed here when ``None``).
    A holder set used once is scanned; the others get one lazy min-heap each:
    an entry whose recorded load is stale is refreshed when it reaches the top;
    loads only grow, so a fresh top is the true minimum.
    """
    if gid is None:
        gid = group_ids(holders)[0]
    uses = np.bincount(np.asarray(gid, dtype=np.int64)).tolist() if len(gid) else []
    at = load.__getitem__
    heaps: dict[int, list[tuple[int, int, int]]] = {}
    replace = heapq.heapreplace
    stop = stop_at if stop_at is not None else 1 << 126
    for k in order:
        hs = holders[k]
        if len(hs) == 1:
            r = hs[0]
            owner[k] = r
            load[r] += weight[k]
            if load[r] >= stop:
                return False
            continue
        g = gid[k]
        if uses[g] == 1:
            # first minimum: torch's, or the lowest rank (the highest: scan backwards)
            r = min(set(hs) if torch_ties else reversed(hs) if high else hs, key=at)
            owner[k] = r
            load[r] += weight[k]
            if load[r] >= stop:
                return False
            continue
        heap = heaps.get(g)
        if heap is None:
            if torch_ties:
                heap = [(load[r], i, r) for i, r in enumerate(set(hs))]
            else:
                heap = [(load[r], -r if high else r, r) for r in hs]
            heapq.heapify(heap)
            heaps[g] = heap
        while True:
            seen, p, r = heap[0]
            cur = load[r]
            if seen == cur:
                break
            replace(heap, (cur, p, r))
        owner[k] = r
        cur += weight[k]
        load[r] = cur
        replace(heap, (cur, p, r))
        if cur >= stop:
            return False
    return True


def _loads(fixed: Sequence[int], rep: Sequence[int], owner: Sequence[int], sizes: Sequence[int]) -> list[int]:
    load = list(fixed)
    for k in rep:
        load[owner[k]] += sizes[k]
    return load


#: holder sets at least this large get a sorted (load, position) list in :func:`_target_fit`
SORTED_FIT_MIN = 8


def _target_fit(
    world: int,
    holders: Sequence[Sequence[int]],
    order: Sequence[int],
    sizes: Sequence[int],
    load: list[int],
    owner: list[int],
    target: int,
    gid: Sequence[int],
) -> None:
    """Each item to the fullest holder it fits on under ``target`` (best fit), else the least-loaded.

    Ties go to the holder listed first. A holder set of :data:`SORTED_FIT_MIN` ranks or more
    whose ranks are in no other such set keeps its ``(load, position)`` pairs in a sorted list
    (every change of a member's load updates it), so the choice is two bisections; the others
    are scanned.
    """
    loadn = np.asarray(load, dtype=np.int64)
    arrays: dict[int, np.ndarray] = {}
    sorted_of: dict[int, list[tuple[int, int]] | None] = {}  # holder set -> its sorted pairs, or None
    member: dict[int, tuple[list[tuple[int, int]], int]] = {}  # rank -> (its set's pairs, its position)
    left, right, insort = bisect.bisect_left, bisect.bisect_right, bisect.insort
    for k in order:
        hs = holders[k]
        p = sizes[k]
        g = gid[k]
        pairs: list[tuple[int, int]] | None = None
        if len(hs) >= SORTED_FIT_MIN:
            if g in sorted_of:
                pairs = sorted_of[g]
            else:
                if len(set(hs)) == len(hs) and not any(r in member for r in hs):
                    pairs = sorted((load[r], i) for i, r in enumerate(hs))
                    for i, r in enumerate(hs):
                        member[r] = (pairs, i)
                sorted_of[g] = pairs
        if pairs is not None:
            j = right(pairs, (target - p, len(hs)))
            if j:  # the largest load that fits, its first holder
                r = hs[pairs[left(pairs, (pairs[j - 1][0], -1))][1]]
            else:
                r = hs[pairs[0][1]]
        elif len(hs) <= 16:
            best_r, best_l, low_r, low_l = -1, -1, -1, -1
            for r in hs:
                lr = load[r]
                if lr + p <= target and lr > best_l:
                    best_r, best_l = r, lr
                if low_r < 0 or lr < low_l:
                    low_r, low_l = r, lr
            r = best_r if best_r >= 0 else low_r
        else:
            arr = arrays.get(g)
            if arr is None:
                arr = arrays[g] = np.asarray(hs, dtype=np.int64)
            ls = loadn[arr]
            fits = ls + p <= target
            if fits.any():
                cand = np.where(fits, ls, -1)
                r = int(arr[int(np.argmax(cand))])
            else:
                r = int(arr[int(np.argmin(ls))])
        owner[k] = r
        old = load[r]
        load[r] = old + p
        loadn[r] = old + p
        m = member.get(r)
        if m is not None:
            mp, i = m
            del mp[left(mp, (old, i))]
            insort(mp, (old + p, i))


def solve(
    world: int,
    holders: Sequence[Sequence[int]],
    sizes: Sequence[int],
    *,
    lower_bound: int = 0,
    torch_weights: Sequence[int] | Callable[[], Sequence[int]] | None = None,
    max_steps: int | None = None,
) -> Solution:
    """Owners for every item (see the module doc); ``sizes`` are the bytes each item writes.

    Entries are built cheapest first and the rest are skipped once one reaches
    ``lower_bound`` (nothing can beat it): ``fewest_holders`` and ``lpt_fixed``;
    then ``lpt`` and ``target``; the best is improved; then, if still above the
    bound, torch's greedy, which replaces the result (improved too) only when
    strictly better.

    :param lower_bound: a lower bound on the busiest load (the search stops there).
    :param torch_weights: torch's weight per item, or a function returning them
        (called only when needed); when given, torch's greedy (items in index
        order) is part of the portfolio.
    :param max_steps: local-search steps, all starts together (default
        ``4 * (world + replicated items)``, at most :data:`MAX_STEPS`).
    """
    n = len(holders)
    lens = np.fromiter(map(len, holders), dtype=np.int64, count=n)
    rep: list[int] = np.flatnonzero(lens > 1).tolist()
    base_owner: list[int] = list(map(_FIRST, holders))
    single = np.flatnonzero(lens == 1)
    fixed_np = np.zeros(world, dtype=np.int64)
    if len(single):
        np.add.at(fixed_np, np.asarray(base_owner, dtype=np.int64)[single], np.asarray(sizes, dtype=np.int64)[single])
    fixed: list[int] = fixed_np.tolist()
    gid, groups = group_ids(holders)
    candidates: dict[str, tuple[list[int], list[int]]] = {}

    def add(name: str, owner: list[int]) -> None:
        candidates[name] = (owner, _loads(fixed, rep, owner, sizes))

    def best() -> int:
        return min(busiest(ld) for _, ld in candidates.values())

    orders: dict[tuple[bool, str], list[int]] = {}

    # greedy passes with identical inputs give identical owners: with no single-holder item, fixed
    # loads first changes nothing (the same order from the same zero loads). The twin of a variant
    # already run would return False: either that pass reached a stop at least as high as today's
    # (the result only gets lighter), or it finished below the result, and then its local search
    # (which never raises the busiest load) made the result at most as heavy as that pass.
    all_rep = len(rep) == n
    passes: set[tuple[bool, str, str]] = set()

    def _lpt_variant(name: str, order: str, tie: str, fixed_first: bool, stop_at: int) -> bool:
        key = (fixed_first and not all_rep, order, tie)
        if key in passes:
            return False
        passes.add(key)
        seq = orders.get((fixed_first, order))
        if seq is None:
            ks = np.asarray(rep if fixed_first else range(n), dtype=np.int64)
            sz = np.asarray(sizes, dtype=np.int64)[ks]
            if order == "last":  # equal sizes: last seen first
                ks, sz = ks[::-1], sz[::-1]
            seq = orders[fixed_first, order] = ks[np.argsort(-sz, kind="stable")].tolist()
        owner = list(base_owner)
        load = list(fixed) if fixed_first else [0] * world
        if fixed_first and max(load, default=0) >= stop_at:
            return False
        if not greedy(world, holders, seq, sizes, load, owner, tie == "torch", gid, high=tie == "high", stop_at=stop_at):
            return False  # it reached the result's busiest load: it cannot beat it
        add(name, owner)
        return True

    if not rep:
        add("fixed", list(base_owner))
    else:
        rep_sizes = np.asarray([sizes[k] for k in rep], dtype=np.int64)
        rep_by_size = [rep[i] for i in np.argsort(-rep_sizes, kind="stable").tolist()]  # ties: first seen
        owner = list(base_owner)
        greedy(world, holders, rep_by_size, sizes, list(fixed), owner, gid=gid)
        add("lpt_fixed", owner)
        fhf = sorted(rep_by_size, key=lambda k: len(holders[k]))  # stable: then largest, then first seen
        if len({len(holders[k]) for k in rep}) == 1:  # one holder count: the same order as lpt_fixed
            add("fewest_holders", list(owner))
        else:
            owner = list(base_owner)
            greedy(world, holders, fhf, sizes, list(fixed), owner, gid=gid)
            add("fewest_holders", owner)
        if best() > lower_bound:
            if all_rep:  # no fixed load: lpt is lpt_fixed (the same order from zero loads)
                add("lpt", list(candidates["lpt_fixed"][0]))
            else:
                by_size = np.argsort(-np.asarray(sizes, dtype=np.int64), kind="stable").tolist()
                owner = list(base_owner)
                greedy(world, holders, by_size, sizes, [0] * world, owner, gid=gid)
                add("lpt", owner)
        if best() > lower_bound:
            owner = list(base_owner)
            _target_fit(world, holders, fhf, sizes, list(fixed), owner, lower_bound, gid)
            add("target", owner)
    steps = max_steps if max_steps is not None else min(4 * (world + len(rep)), MAX_STEPS)
    shape = (gid, groups)
    result = _search(candidates, world, holders, sizes, rep, lower_bound, steps, shape)
    if rep and result.busiest > lower_bound + lower_bound // VARIANT_SLACK:
        # an LPT variant cannot go below the bound: past 0.1 % above it, try them one by one
        for name, (order, tie, ff) in LPT_VARIANTS.items():
            if _lpt_variant(name, order, tie, ff, result.busiest):
                alt = _search({name: candidates[name]}, world, holders, sizes, rep, lower_bound, steps, shape)
                if alt.busiest < result.busiest:
                    result = alt
            if result.busiest <= lower_bound + lower_bound // VARIANT_SLACK:
                break
    if rep and result.busiest > lower_bound and torch_weights is not None:
        tw = torch_weights() if callable(torch_weights) else torch_weights
        owner = list(base_owner)
        greedy(world, holders, range(n), tw, [0] * world, owner, True, gid)
        add("torch", owner)
        if busiest(candidates["torch"][1]) < result.busiest:
            alt = _search({"torch": candidates["torch"]}, world, holders, sizes, rep, lower_bound, steps, shape)
            if alt.busiest < result.busiest:
                result = alt
    scores = {name: busiest(ld) for name, (_, ld) in candidates.items()}
    return attrs.evolve(result, candidates=scores)


_FIRST = operator.itemgetter(0)


def _search(
    candidates: dict[str, tuple[list[int], list[int]]],
    world: int,
    holders: Sequence[Sequence[int]],
    sizes: Sequence[int],
    rep: Sequence[int],
    lower_bound: int,
    steps: int,
    shape: tuple[Sequence[int], Sequence[tuple[int, ...]]],
) -> Solution:
    """Local search from each of ``candidates`` (best first; ties: :data:`PREFERENCE` order).

    The first result that reaches ``lower_bound`` ends it; a later start
    replaces the result only when strictly better. ``steps`` is shared by all
    starts.
    """
    scores = {name: busiest(ld) for name, (_, ld) in candidates.items()}
    result: Solution | None = None
    left = steps
    work = [WORK_PER_ITEM * (world + len(rep)) + MIN_WORK]
    for start in sorted(candidates, key=lambda name: (scores[name], PREFERENCE.index(name))):
        owner, load = candidates[start]
        owner = list(owner)
        load = list(load)
        moves = 0
        if rep and scores[start] > lower_bound and left > 0:
            moves = _improve(world, holders, sizes, rep, owner, load, lower_bound, left, shape, work)
            left -= moves
        top = busiest(load)
        if result is None or top < result.busiest:
            result = Solution(owner=owner, loads=load, busiest=top, start=start, candidates=scores, moves=moves)
        if result.busiest <= lower_bound:
            break
    assert result is not None
    return result


def _improve(
    world: int,
    holders: Sequence[Sequence[int]],
    sizes: Sequence[int],
    rep: Sequence[int],
    owner: list[int],
    load: list[int],
    lower_bound: int,
    steps: int,
    shape: tuple[Sequence[int], Sequence[tuple[int, ...]]],
    work: list[int],
) -> int:
    """Moves, swaps and two-move chains off the busiest rank while every rank involved ends strictly
    below it; returns the steps taken. ``shape``: :func:`group_ids` of ``holders``; ``work``: the
    remaining work units (items examined), shared by all starts and decremented here."""
    on: list[dict[int, None]] = [{} for _ in range(world)]
    gid, groups = shape
    arrays = [np.asarray(g, dtype=np.int64) for g in groups]
    for k in rep:
        on[owner[k]][k] = None
    loadn = np.asarray(load, dtype=np.int64)
    taken = 0
    while taken < steps and work[0] > 0:
        b = int(np.argmax(loadn))  # first maximum: the lowest busiest rank
        top = load[b]
        if top <= lower_bound or not on[b]:
            break
        work[0] -= len(on[b]) + 1
        move = _best_move(b, top, on[b], gid, arrays, sizes, load, loadn, work)
        if move is not None:
            k, r = move
            _apply(k, b, r, sizes, owner, load, loadn, on)
            taken += 1
            continue
        swap = _best_swap(b, top, on, gid, arrays, holders, sizes, load, loadn, work)
        if swap is not None:
            k, r, i = swap
            _apply(k, b, r, sizes, owner, load, loadn, on)
            _apply(i, r, b, sizes, owner, load, loadn, on)
            taken += 1
            continue
        if work[0] <= 0:
            break
        chain = _best_chain(b, top, on, gid, arrays, sizes, load, loadn, work)
        if chain is None:
            break
        k, r, i, dst = chain
        _apply(i, r, dst, sizes, owner, load, loadn, on)
        _apply(k, b, r, sizes, owner, load, loadn, on)
        taken += 1
    return taken


def _apply(
    k: int, src: int, dst: int, sizes: Sequence[int], owner: list[int], load: list[int], loadn: np.ndarray,
    on: list[dict[int, None]],
) -> None:
    p = sizes[k]
    owner[k] = dst
    load[src] -= p
    load[dst] += p
    loadn[src] = load[src]
    loadn[dst] = load[dst]
    del on[src][k]
    on[dst][k] = None


def _least_other(arr: np.ndarray, b: int, loadn: np.ndarray) -> tuple[int, int]:
    """The least-loaded rank of ``arr`` other than ``b`` (ties: lowest rank)."""
    ls = loadn[arr].copy()
    ls[arr == b] = np.iinfo(np.int64).max
    j = int(np.argmin(ls))
    return int(ls[j]), int(arr[j])


def _best_move(
    b: int, top: int, mine: dict[int, None], gid: Sequence[int], arrays: list[np.ndarray],
    sizes: Sequence[int], load: list[int], loadn: np.ndarray, work: list[int],
) -> tuple[int, int] | None:
    """The item of ``b`` and its destination that leave the pair lowest, if both end below ``top``."""
    least: dict[int, tuple[int, int]] = {}
    best: tuple[int, int, int] | None = None
    n_groups = 0
    for k in mine:
        g = gid[k]
        m = least.get(g)
        if m is None:
            m = least[g] = _least_other(arrays[g], b, loadn)
            n_groups += 1
        lr, r = m
        p = sizes[k]
        if p > 0 and lr + p < top:
            score = max(top - p, lr + p)
            if best is None or (score, k) < (best[0], best[1]):
                best = (score, k, r)
    work[0] -= 10 * n_groups  # a numpy pass per holder set
    return None if best is None else (best[1], best[2])


def _best_swap(
    b: int, top: int, on: list[dict[int, None]], gid: Sequence[int], arrays: list[np.ndarray],
    holders: Sequence[Sequence[int]], sizes: Sequence[int], load: list[int], loadn: np.ndarray,
    work: list[int], partners: int = 16,
) -> tuple[int, int, int] | None:
    """A swap of an item of ``b`` with a smaller one of another rank ``r``, both ending below ``top``.

    Partners are the ``partners`` least-loaded ranks sharing a holder set with
    ``b``'s items (ties: lowest rank); for each, the exchange whose size
    difference is closest to half the load gap wins.
    """
    mine = on[b]
    gs = sorted({gid[k] for k in mine})
    work[0] -= 10 * len(gs) + 50
    ranks = np.unique(np.concatenate([arrays[g] for g in gs]))
    ranks = ranks[ranks != b]
    if not len(ranks):
        return None
    order = np.lexsort((ranks, loadn[ranks]))[:partners]
    best: tuple[int, int, int, int, int] | None = None
    for r in ranks[order].tolist():
        gap = top - load[r]
        if gap <= 1:
            continue
        work[0] -= len(mine) + len(on[r])
        outs = [k for k in mine if _holds(holders[k], r)]
        ins = sorted((sizes[i], i) for i in on[r] if _holds(holders[i], b))
        if not outs or not ins:
            continue
        in_sizes = [s for s, _ in ins]
        for k in outs:
            p = sizes[k]
            # want p - q in (0, gap), closest to gap / 2: q closest to p - gap / 2
            want = p - gap / 2
            j = bisect.bisect_left(in_sizes, want)
            for jj in (j - 1, j):
                if 0 <= jj < len(ins):
                    q, i = ins[jj]
                    d = p - q
                    if 0 < d < gap:
                        score = max(top - d, load[r] + d)
                        cand = (score, k, i, r, 0)
                        if best is None or cand < best:
                            best = cand
    return None if best is None else (best[1], best[3], best[2])


def _lightest(arr: np.ndarray, loadn: np.ndarray, count: int) -> list[int]:
    """The ``count`` least-loaded ranks of ``arr`` (ties: lowest rank), lightest first."""
    order = np.lexsort((arr, loadn[arr]))[:count]
    return arr[order].tolist()


def _best_chain(
    b: int, top: int, on: list[dict[int, None]], gid: Sequence[int], arrays: list[np.ndarray],
    sizes: Sequence[int], load: list[int], loadn: np.ndarray, work: list[int], partners: int = 8,
) -> tuple[int, int, int, int] | None:
    """An ejection chain of two moves: item ``k`` of ``b`` to ``r``, item ``i`` of ``r`` to ``s``.

    All three ranks must end strictly below ``top``. For each holder set of
    ``b``'s items, ``r`` ranges over its ``partners`` least-loaded ranks, and
    ``s`` is the least-loaded holder of ``i`` other than ``b`` and ``r``.
    Returns ``(k, r, i, s)`` leaving the three loads lowest, or ``None``.
    Stops early (with the best chain so far) when ``work`` runs out.
    """
    mine = on[b]
    light: dict[int, list[int]] = {}
    best: tuple[int, int, int, int, int] | None = None
    by_group: dict[int, list[int]] = {}
    for k in mine:
        by_group.setdefault(gid[k], []).append(k)
    for g, ks in by_group.items():
        rs = [r for r in _lightest(arrays[g], loadn, partners + 1) if r != b][:partners]
        for r in rs:
            if work[0] <= 0:
                break
            lr = load[r]
            work[0] -= len(on[r]) * (len(ks) + 1)
            for i in on[r]:
                q = sizes[i]
                if q <= 0:
                    continue
                gi = gid[i]
                cand = light.get(gi)
                if cand is None:
                    work[0] -= 20  # a numpy sort of the holder set
                    cand = light[gi] = _lightest(arrays[gi], loadn, 3)
                s = next((x for x in cand if x != r and x != b), -1)
                if s < 0 or load[s] + q >= top:
                    continue
                for k in ks:
                    p = sizes[k]
                    if p <= 0 or lr + p < top:  # a plain move would do (and did not help)
                        continue
                    if lr + p - q < top:
                        score = max(top - p, lr + p - q, load[s] + q)
                        c = (score, k, r, i, s)
                        if best is None or c < best:
                            best = c
    return None if best is None else (best[1], best[2], best[3], best[4])


def _holds(hs: Sequence[int], r: int) -> bool:
    j = bisect.bisect_left(hs, r)
    return j < len(hs) and hs[j] == r
