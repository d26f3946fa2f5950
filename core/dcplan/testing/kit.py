"""The conformance kit: check a dedup strategy against dcplan's contract.

A plugin author checks a strategy in one line, with the ``dcplan_conformance``
pytest fixture (registered by dcplan's pytest plugin)::

    def test_conformance(dcplan_conformance):
        dcplan_conformance(my_strategy)          # a function, a Strategy or a registered name

or without pytest, ``dcplan.testing.kit.check_strategy(my_strategy)``.

The kit generates workloads with hypothesis (1-4 ranks; replicated tensors,
objects, and tensors sharded along any dimension with replicated shards, as
DDP, FSDP and HSDP produce) and checks, for each one, the invariants in
:data:`INVARIANTS`. A broken invariant raises :class:`ConformanceError` naming
it, on the *smallest* workload hypothesis finds (it shrinks the failing one).
Determinism across ``PYTHONHASHSEED`` values is checked by running the strategy
in subprocesses with different seeds on a batch of workloads and comparing the
plans they return.
"""

from __future__ import annotations

import atexit
import copy
import math
import os
import pickle
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs

__all__ = [
    "INVARIANTS",
    "ConformanceError",
    "ConformanceResult",
    "check_plans",
    "check_hash_seed_determinism",
    "check_scaling",
    "check_strategy",
    "large_workloads",
    "conformance_test",
    "describe_workload",
    "plan_digest",
    "result_signature",
    "save_and_load",
    "standard_workloads",
    "workloads",
]

#: Every invariant the kit checks, by the name a :class:`ConformanceError` reports.
INVARIANTS: dict[str, str] = {
    "no_error": "the strategy returns normally on every valid workload",
    "returns_plans": "it returns a list with one SavePlan per rank, in rank order",
    "no_mutation": "it does not mutate its input (the list, the plans, their items or planner_data)",
    "holder_only": "every item (or piece of a split item) is written by a rank that holds it",
    "exactly_once": "every object and every element of every tensor chunk is written exactly once",
    "item_intact": "written items keep the fqn, dtype, global size and kind of the item they come from",
    "planner_data": "each rank's planner_data (its flattening mapping) is passed through unchanged",
    "deterministic": "the same input gives the same plans, in-process and under every PYTHONHASHSEED",
    "index_offset": "every tensor item's MetadataIndex.offset equals its chunk offset (else every load fails)",
    "metadata_validates": "dcplan.save.metadata.build_global_plan and validate_global_plan accept the result",
    "runtime_check": "dcplan.save.verify, the check every save runs on the coordinator, accepts the result",
    "report": "dcplan.save.report.build_report produces a balance report that accounts for every byte",
    "scales_linearly": "its time grows about linearly with the plan entries (8x entries: well under 64x time)",
}

DEFAULT_HASH_SEEDS: tuple[int, ...] = (1, 2)
_BATCH = 40


class ConformanceError(AssertionError):
    """A strategy broke one of :data:`INVARIANTS` on the workload ``plans``.

    :ivar invariant: the invariant's name (a key of :data:`INVARIANTS`).
    :ivar detail: what went wrong, naming items and ranks.
    :ivar plans: the (minimal) input workload, one ``SavePlan`` per rank.
    :ivar strategy: the strategy's name.
    """

    def __init__(self, invariant: str, detail: str, plans: Sequence[Any] | None = None, strategy: str = "") -> None:
        self.invariant = invariant
        self.detail = detail
        self.plans = list(plans) if plans is not None else None
        self.strategy = strategy
        rule = INVARIANTS.get(invariant, "")
        msg = f"strategy {strategy or '?'!r} breaks invariant [{invariant}] ({rule}): {detail}"
        if self.plans is not None:
            msg += "\nminimal failing workload:\n" + describe_workload(self.plans)
        super().__init__(msg)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.invariant, self.detail, self.plans, self.strategy))


@attrs.frozen
class ConformanceResult:
    """What :func:`check_strategy` checked: the strategy, how many workloads, and seeds."""

    strategy: str
    examples: int
    hash_seed_workloads: int
    hash_seeds: tuple[int, ...]
    last_report: Any = None


# ------------------------------------------------------------------ helpers
def _key(item: Any) -> tuple[str, tuple[int, ...]]:
    return (item.index.fqn, tuple(item.index.offset or ()))


def _chunk(item: Any) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    td = item.tensor_data
    if td is None or td.chunk is None:
        return None
    return tuple(td.chunk.offsets), tuple(td.chunk.sizes)


def _fmt_item(item: Any) -> str:
    from dcplan.save.local import item_nbytes

    td = item.tensor_data
    if td is None:
        return f"{item.index.fqn} (object, {item_nbytes(item)} B)"
    ch = _chunk(item)
    dtype = str(td.properties.dtype).removeprefix("torch.")
    if ch is None:
        return f"{item.index.fqn} ({dtype} {tuple(td.size)}, no chunk)"
    offs, sizes = ch
    if tuple(sizes) == tuple(td.size):
        where = ""
    else:
        where = "[" + ", ".join(f"{o}:{o + s}" for o, s in zip(offs, sizes)) + "]"
    return f"{item.index.fqn}{where} ({dtype} {list(td.size)}, {item_nbytes(item)} B)"


def describe_workload(plans: Sequence[Any]) -> str:
    """A compact, readable rendering of one plan per rank (used in error messages)."""
    lines = []
    for rank, plan in enumerate(plans):
        items = getattr(plan, "items", None)
        if items is None:
            lines.append(f"  rank {rank}: {plan!r}")
            continue
        body = ", ".join(_fmt_item(i) for i in items) or "(no items)"
        lines.append(f"  rank {rank}: {body}")
    return "\n".join(lines) if lines else "  (no ranks)"


def result_signature(plans: Sequence[Any]) -> tuple[Any, ...]:
    """A hashable, comparable summary of a strategy's result: per rank, its items in order and its planner_data.

    (Not :func:`dcplan.save.local.plan_digest`, the 16-byte digest a rank sends
    with its plan, nor :func:`dcplan.save.cache.structure_fingerprint`.)
    """
    out = []
    for plan in plans:
        items = tuple((i.index.fqn, tuple(i.index.offset or ()), i.type.name, _chunk(i)) for i in plan.items)
        out.append((items, repr(plan.planner_data)))
    return tuple(out)


#: the old name of :func:`result_signature`
plan_digest = result_signature


def _contains(outer: tuple[tuple[int, ...], tuple[int, ...]], inner: tuple[tuple[int, ...], tuple[int, ...]]) -> bool:
    (oo, os_), (io, is_) = outer, inner
    if len(oo) != len(io) or len(os_) != len(is_):
        return False
    return all(a <= b and b + s <= a + t for a, t, b, s in zip(oo, os_, io, is_))


def _overlap(a: tuple[tuple[int, ...], tuple[int, ...]], b: tuple[tuple[int, ...], tuple[int, ...]]) -> bool:
    if math.prod(a[1]) == 0 or math.prod(b[1]) == 0:
        return False
    return all(ao < bo + bs and bo < ao + as_ for ao, as_, bo, bs in zip(a[0], a[1], b[0], b[1]))


def _fmt_chunk(fqn: str, ch: tuple[tuple[int, ...], tuple[int, ...]] | None, size: Any = None) -> str:
    if ch is None or not ch[0] or (size is not None and tuple(ch[1]) == tuple(size)):
        return fqn
    return fqn + "[" + ", ".join(f"{o}:{o + s}" for o, s in zip(*ch)) + "]"


def _copies(plans: Sequence[Any]) -> list[Any]:
    """A copy of the plans that shares nothing with them (one pickle round trip: far faster than
    ``copy.deepcopy``; items shared between ranks stay shared within the copy)."""
    return list(pickle.loads(pickle.dumps(list(plans), protocol=pickle.HIGHEST_PROTOCOL)))


# ------------------------------------------------------------------ one workload
def _run(func: Callable[..., Any], plans: list[Any], options: Mapping[str, Any], name: str) -> Any:
    try:
        return func(plans, **options)
    except ConformanceError:
        raise
    except Exception as exc:  # noqa: BLE001 - reported as an invariant
        tb = traceback.format_exc(limit=-3)
        raise ConformanceError(
            "no_error", f"it raised {type(exc).__name__}: {exc}\n{tb}", plans, name
        ) from exc


@attrs.define
class _Case:
    """One workload under check: the input as given, its holders, and the strategy's name."""

    name: str
    original: list[Any]
    holders: dict[tuple[str, tuple[int, ...]], list[int]] = attrs.field(factory=dict)
    first: dict[tuple[str, tuple[int, ...]], Any] = attrs.field(factory=dict)
    by_rank_fqn: list[dict[str, list[Any]]] = attrs.field(factory=list)

    def fail(self, invariant: str, detail: str) -> ConformanceError:
        return ConformanceError(invariant, detail, self.original, self.name)

    def index(self) -> None:
        for rank, p in enumerate(self.original):
            idx: dict[str, list[Any]] = {}
            for item in p.items:
                k = _key(item)
                hs = self.holders.setdefault(k, [])
                if rank not in hs:
                    hs.append(rank)
                self.first.setdefault(k, item)
                idx.setdefault(item.index.fqn, []).append(item)
            self.by_rank_fqn.append(idx)


def check_plans(
    strategy: Any, plans: Sequence[Any], options: Mapping[str, Any] | None = None, *, name: str | None = None
) -> Any:
    """Check one workload in-process; return the :class:`dcplan.save.report.PlanReport`.

    Each invariant of :data:`INVARIANTS` is one ``_check_<invariant>`` function, run in that order.

    :param strategy: a strategy function, a :class:`dcplan.Strategy` or a registered name.
    :param plans: one local ``SavePlan`` per rank (they are copied, never changed).
    :param options: strategy options (defaults of a :class:`dcplan.Strategy` apply).
    :raises ConformanceError: naming the first broken invariant.
    """
    sname, func, opts = _resolve(strategy, options, name)
    case = _Case(sname, list(plans))  # never handed to the strategy: the reference for no_mutation
    given = _copies(plans)
    arg = list(given)
    result = _run(func, arg, opts, sname)
    _check_no_mutation(case, arg, given)
    _check_returns_plans(case, result)
    case.index()
    pieces = _check_holder_only(case, result)
    _check_item_intact(case, result)
    _check_exactly_once(case, pieces)
    _check_index_offset(case, result)
    _check_planner_data(case, result)
    _check_deterministic(case, result, func, opts)
    _check_metadata_validates(case, result)
    _check_runtime_check(case, result)
    return _check_report(case, result)


def _check_no_mutation(case: _Case, arg: list[Any], given: list[Any]) -> None:
    if len(arg) != len(case.original) or any(a is not g for a, g in zip(arg, given)):
        raise case.fail("no_mutation", "the list of plans it was given was changed")
    for rank, (now, before) in enumerate(zip(given, case.original)):
        if now.items != before.items:
            raise case.fail(
                "no_mutation",
                f"rank {rank}'s input plan was changed in place (it had {len(before.items)} item(s), now "
                f"{len(now.items)}); build new plans with dataclasses.replace / dcplan.compat.replace_plan",
            )
        if now.planner_data != before.planner_data or now.storage_data != before.storage_data:
            raise case.fail("no_mutation", f"rank {rank}'s input planner_data/storage_data was changed in place")


def _check_returns_plans(case: _Case, result: Any) -> None:
    from dcplan.compat import SavePlan

    world = len(case.original)
    if not isinstance(result, (list, tuple)):
        raise case.fail("returns_plans", f"it returned {type(result).__name__}, not a list")
    if len(result) != world:
        raise case.fail("returns_plans", f"it returned {len(result)} plan(s) for {world} rank(s)")
    for rank, p in enumerate(result):
        if not isinstance(p, SavePlan):
            raise case.fail("returns_plans", f"element {rank} is a {type(p).__name__}, not a SavePlan")


def _container(case: _Case, rank: int, item: Any) -> Any:
    """The input item of ``rank`` that ``item`` (whole, or a slice of it) comes from, or ``None``."""
    ch = _chunk(item)
    for cand in case.by_rank_fqn[rank].get(item.index.fqn, ()):
        cch = _chunk(cand)
        if ch is None and cch is None and _key(cand) == _key(item):
            return cand
        if ch is not None and cch is not None and _contains(cch, ch):
            return cand
    return None


def _check_holder_only(case: _Case, result: Sequence[Any]) -> dict[Any, list[tuple[int, Any]]]:
    """Every written item lies in what its rank holds; returns who writes which piece of which input item."""
    pieces: dict[tuple[str, tuple[int, ...]], list[tuple[int, Any]]] = {k: [] for k in case.holders}
    for rank, p in enumerate(result):
        for item in p.items:
            container = _container(case, rank, item)
            if container is not None:
                pieces[_key(container)].append((rank, _chunk(item)))
                continue
            fqn, ch = item.index.fqn, _chunk(item)
            full = tuple(item.tensor_data.size) if item.tensor_data is not None else None
            others = sorted(
                r for r in range(len(case.by_rank_fqn)) if _container(case, r, item) is not None
            )
            what = _fmt_chunk(fqn, ch, full)
            if others:
                raise case.fail("holder_only", f"rank {rank} writes {what}, which it does not hold (holders: ranks {others})")
            raise case.fail("holder_only", f"rank {rank} writes {what}, which no rank holds")
    return pieces


def _check_item_intact(case: _Case, result: Sequence[Any]) -> None:
    for rank, p in enumerate(result):
        for item in p.items:
            container = _container(case, rank, item)
            ch = _chunk(item)
            fqn = item.index.fqn
            if item.type != container.type and not (ch is not None and ch != _chunk(container)):
                raise case.fail(
                    "item_intact",
                    f"rank {rank} writes {_fmt_chunk(fqn, ch)} as {item.type.name}; the input item is "
                    f"{container.type.name}",
                )
            if ch is None:
                continue
            td, ctd = item.tensor_data, container.tensor_data
            if td.properties.dtype != ctd.properties.dtype or tuple(td.size) != tuple(ctd.size):
                raise case.fail(
                    "item_intact",
                    f"rank {rank} writes {_fmt_chunk(fqn, ch)} as {td.properties.dtype} {tuple(td.size)}; "
                    f"the input item is {ctd.properties.dtype} {tuple(ctd.size)}",
                )


def _check_exactly_once(case: _Case, pieces: dict[Any, list[tuple[int, Any]]]) -> None:
    for k in sorted(pieces, key=lambda t: (t[0], t[1])):
        got = pieces[k]
        item = case.first[k]
        full = tuple(item.tensor_data.size) if item.tensor_data is not None else None
        what = _fmt_chunk(k[0], _chunk(item), full)
        if not got:
            raise case.fail("exactly_once", f"{what} is dropped: no rank writes it (holders: ranks {case.holders[k]})")
        cch = _chunk(item)
        if cch is None:
            if len(got) > 1:
                raise case.fail("exactly_once", f"{what} is written {len(got)} times, by ranks {sorted(r for r, _ in got)}")
            continue
        _check_pieces_tile(case, k, got, cch, full, what)


def _check_pieces_tile(case: _Case, k: Any, got: list[tuple[int, Any]], cch: Any, full: Any, what: str) -> None:
    """The pieces of one input chunk: no two overlap, together they cover it."""
    order = sorted(range(len(got)), key=lambda i: (got[i][1], got[i][0]))  # sweep by offsets
    for a, b in zip(order, order[1:]):
        (ra, ca), (rb, cb) = got[a], got[b]
        if ca == cb:
            raise case.fail("exactly_once", f"{_fmt_chunk(k[0], ca, full)} is written twice: by rank {min(ra, rb)} "
                            f"and rank {max(ra, rb)}")
    for i in range(len(got)):
        for j in range(i):
            (ri, ci), (rj, cj) = got[i], got[j]
            if _overlap(ci, cj):
                raise case.fail(
                    "exactly_once",
                    f"{_fmt_chunk(k[0], cj)} (rank {rj}) and {_fmt_chunk(k[0], ci)} (rank {ri}) overlap: "
                    "those elements are written twice",
                )
    volume = sum(math.prod(c[1]) for _, c in got)
    total = math.prod(cch[1])
    if volume != total:
        raise case.fail(
            "exactly_once",
            f"{what}: the written pieces cover {volume} of its {total} elements (split pieces must tile the "
            "chunk exactly)",
        )


def _check_index_offset(case: _Case, result: Sequence[Any]) -> None:
    for rank, p in enumerate(result):
        for item in p.items:
            ch = _chunk(item)
            if ch is None:
                continue
            off = tuple(item.index.offset) if item.index.offset is not None else None
            if off != ch[0]:
                raise case.fail(
                    "index_offset",
                    f"rank {rank} writes {_fmt_chunk(item.index.fqn, ch)} with MetadataIndex.offset {off}, not its "
                    f"chunk offset {ch[0]}: every load of the checkpoint would fail with KeyError (build slices with "
                    "index=MetadataIndex(fqn, chunk.offsets))",
                )


def _check_planner_data(case: _Case, result: Sequence[Any]) -> None:
    for rank, (out, inp) in enumerate(zip(result, case.original)):
        if out.planner_data != inp.planner_data:
            raise case.fail(
                "planner_data",
                f"rank {rank}'s planner_data changed from {inp.planner_data!r} to {out.planner_data!r}; keep it "
                "(dcplan.compat.replace_plan(plan, items=...) does)",
            )


def _check_deterministic(case: _Case, result: Sequence[Any], func: Callable[..., Any], opts: Mapping[str, Any]) -> None:
    again = _run(func, _copies(case.original), opts, case.name)
    if result_signature(again) != result_signature(result):
        raise case.fail(
            "deterministic",
            "two calls on the same input returned different plans (random choices? iteration over a set "
            "or over id()-keyed dicts? sort by item key and break ties by rank)",
        )


def _check_metadata_validates(case: _Case, result: Sequence[Any]) -> None:
    from dcplan.save.metadata import build_global_plan
    from dcplan.save.validate import validate_global_plan

    global_plan, metadata, errors = build_global_plan(list(result))
    if not errors:
        errors = validate_global_plan(global_plan, metadata)
    if errors:
        raise case.fail("metadata_validates", "; ".join(errors[:5]))


def _check_runtime_check(case: _Case, result: Sequence[Any]) -> None:
    from dcplan.save import verify
    from dcplan.save.index import index_plans

    index = index_plans(case.original)
    try:
        verify.check_consistency(index, case.original)
    except Exception:  # noqa: BLE001 - an inconsistent input workload: not the strategy's fault
        return
    found = verify.find_violations(index, list(result))
    if found:
        raise case.fail("runtime_check", "; ".join(found.shown) + (f" (and {found.total - len(found.shown)} more)"
                                                                  if found.total > len(found.shown) else ""))


def _check_report(case: _Case, result: Sequence[Any]) -> Any:
    from dcplan.save.local import item_nbytes
    from dcplan.save.report import build_report

    try:
        report = build_report(case.original, list(result), case.name)
    except Exception as exc:  # noqa: BLE001
        raise case.fail("report", f"build_report raised {type(exc).__name__}: {exc}") from exc
    unique = sum(item_nbytes(case.first[k]) for k in case.first)
    world = len(case.original)
    if len(report.bytes_per_rank) != world or report.total_bytes != unique:
        raise case.fail(
            "report",
            f"the report counts {report.total_bytes} B on {len(report.bytes_per_rank)} rank(s); the workload has "
            f"{unique} unique B on {world} rank(s)",
        )
    return report


# ------------------------------------------------------------------ strategy resolution
def _sanitize(name: str) -> str:
    out = "".join(c if c.isalnum() or c == "_" else "_" for c in name.lower()).strip("_")
    return out if out and out[0].isalpha() else f"s_{out}"


def _resolve(
    strategy: Any, options: Mapping[str, Any] | None, name: str | None = None
) -> tuple[str, Callable[..., Any], dict[str, Any]]:
    from dcplan.types import Strategy

    if isinstance(strategy, str):
        from dcplan.manager import get_plugin_manager

        strategy = get_plugin_manager().get_strategy(strategy)
    if isinstance(strategy, Strategy):
        return name or strategy.name, strategy.func, strategy.resolve_options(options)
    if callable(strategy):
        return name or str(getattr(strategy, "__name__", "strategy")), strategy, dict(options or {})
    raise TypeError(
        f"expected a strategy function, a dcplan.Strategy or a registered strategy name, got {strategy!r}"
    )


def _spec(strategy: Any) -> tuple[str, Any]:
    """How a subprocess finds the strategy: by registered name, or by pickled reference."""
    if isinstance(strategy, str):
        return ("name", strategy)
    try:
        pickle.dumps(strategy)
    except Exception as exc:  # noqa: BLE001
        raise TypeError(
            f"cannot check {strategy!r} under other PYTHONHASHSEED values: it cannot be pickled by reference "
            f"({type(exc).__name__}: {exc}). Define the strategy function at module level in an importable "
            "module, pass its registered name, or pass hash_seeds=() to skip this check"
        ) from None
    return ("object", strategy)


# ------------------------------------------------------------------ workloads
def workloads(
    max_world_size: int = 4, max_entries: int = 6, max_dim: int = 8
) -> Any:  # -> hypothesis.strategies.SearchStrategy[list[SavePlan]]
    """A hypothesis strategy of valid local-plan workloads (one ``SavePlan`` per rank).

    Each entry of the state dict is one of: a tensor (any dtype, 0-2 dims, possibly
    empty) held by a random non-empty set of ranks; an object (``BYTE_IO``, with
    or without a recorded size); or a tensor cut into 1..world pieces along one
    dimension, each piece held by its own random set of ranks (FSDP/HSDP-like).
    Every rank's ``planner_data`` maps its keys to their nested path, as the
    flattening mapping does. The union of all chunks covers every tensor.
    """
    import torch
    from hypothesis import strategies as st

    from dcplan.compat import SavePlan
    from dcplan.testing.plans import bytes_item, tensor_item

    dtypes = st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.uint8, torch.float64])

    @st.composite
    def _build(draw: Any) -> list[Any]:
        world = draw(st.integers(1, max_world_size))
        holder_sets = st.lists(st.integers(0, world - 1), min_size=1, max_size=world, unique=True)
        per_rank: list[list[Any]] = [[] for _ in range(world)]
        n = draw(st.integers(0, max_entries))
        for i in range(n):
            kind = draw(st.sampled_from(["tensor", "sharded", "object", "tensor"]))
            fqn = f"{draw(st.sampled_from(['model', 'optim', 'extra']))}.p{i}"
            if kind == "object":
                nbytes = draw(st.none() | st.integers(1, 1 << 16))
                item = bytes_item(fqn, nbytes)
                for r in sorted(draw(holder_sets)):
                    per_rank[r].append(item)
            elif kind == "tensor":
                shape = draw(st.lists(st.integers(0, max_dim), min_size=0, max_size=2))
                item = tensor_item(fqn, shape, dtype=draw(dtypes))
                for r in sorted(draw(holder_sets)):
                    per_rank[r].append(item)
            else:
                shape = draw(st.lists(st.integers(1, max_dim), min_size=1, max_size=2))
                dim = draw(st.integers(0, len(shape) - 1))
                pieces = draw(st.integers(1, min(world, shape[dim])))
                cuts = sorted(draw(st.sets(st.integers(1, shape[dim] - 1), min_size=pieces - 1,
                                           max_size=pieces - 1))) if pieces > 1 else []
                bounds = [0, *cuts, shape[dim]]
                dtype = draw(dtypes)
                for lo, hi in zip(bounds, bounds[1:]):
                    offsets = [0] * len(shape)
                    sizes = list(shape)
                    offsets[dim], sizes[dim] = lo, hi - lo
                    item = tensor_item(fqn, shape, offsets, sizes, dtype=dtype)
                    for r in sorted(draw(holder_sets)):
                        per_rank[r].append(item)
        plans = []
        for items in per_rank:
            mapping = {i.index.fqn: tuple(i.index.fqn.split(".")) for i in items}
            plans.append(SavePlan(items, planner_data=mapping))
        return plans

    return _build()


def standard_workloads() -> list[list[Any]]:
    """Fixed, realistic workloads (DDP, HSDP, FSDP + replicated objects) used for the hash-seed check."""
    import torch

    from dcplan.compat import SavePlan
    from dcplan.testing.plans import bytes_item, tensor_item

    out: list[list[Any]] = []

    def mk(per_rank: list[list[Any]]) -> list[Any]:
        return [SavePlan(items, planner_data={i.index.fqn: tuple(i.index.fqn.split(".")) for i in items})
                for items in per_rank]

    for world in (2, 3, 4):
        # DDP: every rank holds everything, equal and unequal sizes, a few objects
        items = [tensor_item(f"model.layer{i}.weight", (8, 8)) for i in range(8)]
        items += [tensor_item(f"model.layer{i}.bias", (i + 1,), dtype=torch.bfloat16) for i in range(8)]
        items += [bytes_item(f"extra.obj{i}", 10 * (i + 1)) for i in range(4)]
        out.append(mk([list(items) for _ in range(world)]))
    # HSDP on 4 ranks: 2 shards, each replicated on 2 ranks
    per_rank: list[list[Any]] = [[] for _ in range(4)]
    for t in range(6):
        for shard in range(2):
            it = tensor_item(f"model.w{t}", (8, 4), (4 * shard, 0), (4, 4))
            per_rank[shard].append(it)
            per_rank[shard + 2].append(it)
    for r in range(4):
        per_rank[r].append(bytes_item("extra.step", 8))
    out.append(mk(per_rank))
    return out


def large_workloads(world: int = 64, entries: int = 200, seed: int = 0) -> list[list[Any]]:
    """Fixed workloads at scale: realistic layouts of :mod:`dcplan.workloads` on ``world`` ranks, and a
    generated one with ``entries`` state-dict entries (replicated, sharded and HSDP-like tensors, objects).

    Bugs that need more than a few ranks or items (an off-by-one in a per-group
    loop, a rank index used as an item index) show up here; hypothesis' generated
    workloads stay small so that failures shrink to a readable example.
    """
    import random

    from dcplan import workloads as wl
    from dcplan.compat import replace_plan

    def mapped(plans: list[Any]) -> list[Any]:
        return [replace_plan(p, planner_data={i.index.fqn: tuple(i.index.fqn.split(".")) for i in p.items})
                for p in plans]

    out = [mapped(wl.ddp("tiny", world)), mapped(wl.hsdp("tiny", world, shard=8))]
    rng = random.Random(seed)
    return out + [_generated(world, entries, rng), _generated(13, 40, rng), _generated(6, 24, rng)]


def _generated(world: int, entries: int, rng: Any) -> list[Any]:
    """A random valid workload: replicated, partially held and HSDP-like sharded tensors, and objects."""
    from dcplan.compat import SavePlan
    from dcplan.testing.plans import bytes_item, tensor_item

    per_rank: list[list[Any]] = [[] for _ in range(world)]
    for i in range(entries):
        kind = rng.choice(["replicated", "hsdp", "object", "partial"])
        fqn = f"model.layer{i // 4}.p{i}"
        if kind == "object":
            item = bytes_item(fqn, rng.randint(1, 4096))
            for r in range(world):
                per_rank[r].append(item)
        elif kind in ("replicated", "partial"):
            item = tensor_item(fqn, (rng.randint(1, 64), rng.randint(1, 8)))
            holders = range(world) if kind == "replicated" else sorted(
                rng.sample(range(world), rng.randint(1, min(8, world)))
            )
            for r in holders:
                per_rank[r].append(item)
        else:
            shard = rng.choice([s for s in (1, 2, 4, 8, 16) if s <= world])  # each shard on every shard-th rank
            rows = shard * rng.randint(1, 4)
            step = rows // shard
            for s in range(shard):
                item = tensor_item(fqn, (rows, 4), (s * step, 0), (step, 4))
                for r in range(s, world, shard):
                    per_rank[r].append(item)
    return [SavePlan(items, planner_data={i.index.fqn: tuple(i.index.fqn.split(".")) for i in items})
            for items in per_rank]


#: the workload grows this many times between the two timings
SCALING_FACTOR = 8
#: a strategy whose time grows more than this when the workload grows 8x is super-linear
#: (linear: about 8x, up to ~20x measured with cache effects; quadratic: about 64x)
SCALING_LIMIT = 32.0


def _scaling_workload(items: int, world: int = 8) -> list[Any]:
    """``items`` tensors, each held by 2 of ``world`` ranks (HSDP-like), plus objects everyone holds."""
    from dcplan.compat import SavePlan
    from dcplan.testing.plans import bytes_item, tensor_item

    per_rank: list[list[Any]] = [[] for _ in range(world)]
    for i in range(items):
        item = tensor_item(f"model.p{i}", (4 + i % 13, 4))
        for r in (i % world, (i + world // 2) % world):
            per_rank[r].append(item)
    for i in range(items // 50):
        obj = bytes_item(f"extra.o{i}", 16)
        for r in range(world):
            per_rank[r].append(obj)
    return [SavePlan(p) for p in per_rank]


def _best_time(func: Callable[..., Any], plans: list[Any], opts: Mapping[str, Any], repeat: int = 3) -> float:
    import gc

    best = float("inf")
    for _ in range(repeat):
        gc.disable()
        try:
            t0 = time.perf_counter()
            func(plans, **opts)
            best = min(best, time.perf_counter() - t0)
        finally:
            gc.enable()
    return best


def check_scaling(
    strategy: Any, options: Mapping[str, Any] | None = None, *, min_seconds: float = 0.01, max_items: int = 32000
) -> float:
    """Time the strategy on a workload and on one :data:`SCALING_FACTOR` times as large; fail if its time
    grows clearly super-linearly.

    The smaller workload grows (from 250 items, doubling, at most ``max_items``)
    until one call takes ``min_seconds``, so timer noise stays small. Linear growth
    gives a ratio near 8, quadratic near 64; the limit is :data:`SCALING_LIMIT`. A
    ratio above it is measured again before failing, so a busy machine does not
    fail a linear strategy.

    :returns: the measured time ratio.
    :raises ConformanceError: ``scales_linearly``, naming both sizes and times.
    """
    sname, func, opts = _resolve(strategy, options)
    _run(func, _scaling_workload(250), opts, sname)  # warm up (imports, caches); errors are no_error
    items = 250
    while True:
        small = _scaling_workload(items)
        t_small = _best_time(func, small, opts, repeat=2)
        if t_small >= min_seconds or items >= max_items:
            break
        items *= 2
    big = _scaling_workload(SCALING_FACTOR * items)
    ratio = 0.0
    for attempt in range(2):
        if attempt:
            t_small = _best_time(func, small, opts)
        t_big = _best_time(func, big, opts, repeat=2)
        ratio = t_big / max(t_small, 1e-4)
        if ratio <= SCALING_LIMIT:
            return ratio
    n_small, n_big = (sum(len(p.items) for p in w) for w in (small, big))
    raise ConformanceError(
        "scales_linearly",
        f"{n_small:,} plan entries took {t_small * 1e3:.1f} ms and {n_big:,} ({SCALING_FACTOR}x) took "
        f"{t_big * 1e3:.1f} ms: {ratio:.1f}x slower (linear is about {SCALING_FACTOR}x, quadratic "
        f"{SCALING_FACTOR ** 2}x). A real save has millions of entries: index "
        "the plans once (dicts keyed by item, or the PlanIndex a strategy gets as index=) instead of scanning "
        "lists per item",
        None,
        sname,
    )


# ------------------------------------------------------------------ PYTHONHASHSEED
_DONE = "--dcplan-kit-done--"


def _answer(request: str) -> None:
    """Serve one request file: ``(spec, options, batch, dst)`` -> pickled ``(status, digests)`` in ``dst``."""
    with open(request, "rb") as fh:
        spec, options, batch, dst, paths = pickle.load(fh)
    new = [p for p in paths if p not in sys.path]
    if new:  # the caller's sys.path grew (e.g. a test put a package on it): see its modules and plugins
        import importlib

        sys.path.extend(new)
        importlib.invalidate_caches()
        from dcplan.manager import reset_plugin_manager

        reset_plugin_manager()
    try:
        _, func, opts = _resolve(spec[1], options)
        digests = [result_signature(func(_copies(plans), **opts)) for plans in batch]
        out: tuple[str, Any] = ("ok", digests)
    except BaseException as exc:  # noqa: BLE001
        out = ("err", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
    with open(dst, "wb") as fh:
        pickle.dump(out, fh)


def _serve() -> None:  # pragma: no cover - runs in a subprocess
    """A worker kept alive across checks: one request file path per stdin line."""
    for line in sys.stdin:
        path = line.strip()
        if not path:
            break
        _answer(path)
        print(_DONE, flush=True)


class _SeedWorker:
    """A Python subprocess with a fixed ``PYTHONHASHSEED``, reused by every check in this process.

    Importing torch costs seconds, so each (seed, DCPLAN_* env) gets one worker for
    the life of the test session; every request carries the caller's ``sys.path``.
    """

    def __init__(self, seed: int, env: dict[str, str]) -> None:
        self.seed = seed
        cmd = [sys.executable, "-u", "-c", "from dcplan.testing.kit import _serve; _serve()"]
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            cmd, env=dict(env, PYTHONHASHSEED=str(seed)), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self.log, text=True,
        )

    def send(self, request: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(request + "\n")
        self.proc.stdin.flush()

    def wait(self, timeout: float) -> None:
        import selectors

        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    self.close()
                    raise RuntimeError(f"the PYTHONHASHSEED={self.seed} worker did not answer within {timeout}s")
                line = self.proc.stdout.readline()
                if not line:
                    self.log.seek(0)
                    err = self.log.read().decode(errors="replace")[-3000:]
                    self.close()
                    raise RuntimeError(f"the PYTHONHASHSEED={self.seed} worker died (exit {self.proc.poll()}):\n{err}")
                if line.strip() == _DONE:
                    return

    def close(self) -> None:
        try:
            if self.proc.poll() is None and self.proc.stdin is not None:
                self.proc.stdin.close()
                self.proc.wait(timeout=10)
        except Exception:  # noqa: BLE001
            pass
        if self.proc.poll() is None:
            self.proc.kill()


_workers: dict[tuple[Any, ...], _SeedWorker] = {}


@atexit.register
def _close_workers() -> None:
    for w in _workers.values():
        w.close()
    _workers.clear()


def _worker(seed: int) -> _SeedWorker:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([p for p in sys.path if p] + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("PYTHONHASHSEED", None)
    key = (seed, tuple(sorted((k, v) for k, v in env.items() if k.startswith("DCPLAN_"))))
    w = _workers.get(key)
    if w is None or w.proc.poll() is not None:
        w = _workers[key] = _SeedWorker(seed, env)
    return w


def check_hash_seed_determinism(
    strategy: Any,
    batch: Sequence[Sequence[Any]],
    options: Mapping[str, Any] | None = None,
    hash_seeds: Sequence[int] = DEFAULT_HASH_SEEDS,
    *,
    timeout: float = 300.0,
) -> None:
    """Run the strategy on ``batch`` under each ``PYTHONHASHSEED``; all plans must match this process's.

    Each seed has a worker subprocess that is started once and reused by later
    checks in the same process.

    :raises ConformanceError: ``deterministic``, on the smallest workload whose plans differ.
    """
    sname, func, opts = _resolve(strategy, options)
    spec = _spec(strategy)
    batch = [list(b) for b in batch]
    mine = [result_signature(func(_copies(plans), **opts)) for plans in batch]
    results: dict[int, list[Any]] = {}
    with tempfile.TemporaryDirectory(prefix="dcplan-kit-") as tmp:
        sent = []
        for seed in hash_seeds:
            worker = _worker(seed)
            src = os.path.join(tmp, f"in{seed}.pkl")
            dst = os.path.join(tmp, f"out{seed}.pkl")
            with open(src, "wb") as fh:
                pickle.dump((spec, dict(options or {}), batch, dst, [p for p in sys.path if p]), fh)
            worker.send(src)
            sent.append((seed, dst, worker))
        for seed, dst, worker in sent:
            worker.wait(timeout)
            with open(dst, "rb") as fh:
                status, value = pickle.load(fh)
            if status != "ok":
                raise ConformanceError("no_error", f"under PYTHONHASHSEED={seed} it failed: {value}", None, sname)
            results[seed] = value
    bad: list[tuple[int, int]] = []
    for seed, digests in results.items():
        for i, (a, b) in enumerate(zip(mine, digests)):
            if a != b:
                bad.append((i, seed))
    if not bad:
        return
    i, seed = min(bad, key=lambda t: (sum(len(p.items) for p in batch[t[0]]), len(batch[t[0]]), t[0], t[1]))
    here = os.environ.get("PYTHONHASHSEED", "random")
    ranks = [r for r, (a, b) in enumerate(zip(mine[i], results[seed][i])) if a != b]
    raise ConformanceError(
        "deterministic",
        f"the plans differ between PYTHONHASHSEED={here} (this process) and PYTHONHASHSEED={seed} on ranks "
        f"{ranks}: the strategy depends on the iteration order of a set or dict of str/bytes (or on hash()); "
        "sort by item key and break ties by rank",
        batch[i],
        sname,
    )


# ------------------------------------------------------------------ entry point
def check_strategy(
    strategy: Any,
    options: Mapping[str, Any] | None = None,
    *,
    max_examples: int = 100,
    max_world_size: int = 4,
    hash_seeds: Sequence[int] = DEFAULT_HASH_SEEDS,
    derandomize: bool = True,
    extra_workloads: Sequence[Sequence[Any]] = (),
    max_entries: int = 6,
    large: bool = True,
    scaling: bool = True,
) -> ConformanceResult:
    """Check a strategy against every invariant in :data:`INVARIANTS`.

    :param strategy: a strategy function ``func(all_plans, **options)``, a
        :class:`dcplan.Strategy`, or the name of an installed strategy.
    :param options: strategy options (a :class:`dcplan.Strategy`'s defaults apply).
    :param max_examples: how many generated workloads hypothesis tries.
    :param max_world_size: the largest world size generated (at least 1).
    :param hash_seeds: ``PYTHONHASHSEED`` values to compare against in subprocesses
        (``()`` skips that check; the function must then need no pickling).
    :param derandomize: generate the same workloads on every run (reproducible CI).
    :param extra_workloads: your own workloads (lists of ``SavePlan``), checked too.
    :param max_entries: the most state-dict entries of a generated workload.
    :param large: also check :func:`large_workloads` (64 ranks, hundreds of items).
    :param scaling: also run :func:`check_scaling` (time at two sizes).
    :returns: a :class:`ConformanceResult`.
    :raises ConformanceError: naming the broken invariant, on a minimal workload;
        never a hypothesis ``ExceptionGroup``.
    """
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Flaky

    sname, _, _ = _resolve(strategy, options)
    if hash_seeds:
        _spec(strategy)  # fail fast when the subprocesses could not find it
    seen: list[list[Any]] = []
    counter = [0]
    last: list[Any] = [None]
    for plans in extra_workloads:
        last[0] = check_plans(strategy, plans, options)

    @settings(
        max_examples=max_examples,
        derandomize=derandomize,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        print_blob=False,
        report_multiple_bugs=False,  # one ConformanceError, never an ExceptionGroup
    )
    @given(workloads(max_world_size=max_world_size, max_entries=max_entries))
    def _conformance(plans: list[Any]) -> None:
        last[0] = check_plans(strategy, plans, options)
        counter[0] += 1
        if len(seen) < _BATCH and sum(len(p.items) for p in plans) > 1:
            seen.append(plans)

    try:
        _conformance()
    except ConformanceError as exc:
        exc.__notes__ = []  # hypothesis' own note repeats the workload as a huge repr
        raise
    except BaseExceptionGroup as group:  # defensive: hypothesis found several distinct failures
        found = [e for e in _leaves(group) if isinstance(e, ConformanceError)]
        if not found:
            raise
        best = min(found, key=lambda e: (sum(len(p.items) for p in e.plans or []), len(e.plans or [])))
        best.__notes__ = []
        raise best from None
    except Flaky as exc:
        raise ConformanceError(
            "deterministic",
            "a failure came and went on the same workload (hypothesis: flaky); the strategy is not a pure "
            f"function of its input: {exc}",
            None,
            sname,
        ) from exc

    batch = standard_workloads() + [list(w) for w in extra_workloads] + seen
    if hash_seeds:
        check_hash_seed_determinism(strategy, batch, options, hash_seeds)
    if large:
        for plans in large_workloads():
            last[0] = _check_large(strategy, plans, options)
    if scaling:
        check_scaling(strategy, options)
    return ConformanceResult(
        strategy=sname,
        examples=counter[0],
        hash_seed_workloads=len(batch) if hash_seeds else 0,
        hash_seeds=tuple(hash_seeds),
        last_report=last[0],
    )


def _check_large(strategy: Any, plans: list[Any], options: Mapping[str, Any] | None) -> Any:
    """:func:`check_plans` on a large workload; a failure is shrunk to a small example first."""
    try:
        return check_plans(strategy, plans, options)
    except ConformanceError as exc:
        raise _shrunk(strategy, options, plans, exc) from None


def _fails(strategy: Any, options: Mapping[str, Any] | None, plans: list[Any], invariant: str) -> bool:
    try:
        check_plans(strategy, plans, options)
    except ConformanceError as exc:
        return exc.invariant == invariant
    return False


def _shrunk(
    strategy: Any, options: Mapping[str, Any] | None, plans: list[Any], exc: ConformanceError, budget: float = 30.0
) -> ConformanceError:
    """Remove whole state-dict entries (every rank's items of an fqn), then trailing empty ranks, while the
    same invariant still fails (a greedy delta debugging, bounded by ``budget`` seconds)."""
    from dcplan.compat import replace_plan

    def without(ps: list[Any], drop: set[str]) -> list[Any]:
        return [replace_plan(p, items=[i for i in p.items if i.index.fqn not in drop],
                             planner_data={k: v for k, v in (p.planner_data or {}).items() if k not in drop}
                             if isinstance(p.planner_data, dict) else p.planner_data) for p in ps]

    deadline = time.monotonic() + budget
    cur = plans
    fqns = sorted({i.index.fqn for p in cur for i in p.items})
    chunk = max(1, len(fqns) // 2)
    while chunk >= 1 and time.monotonic() < deadline:
        i, removed = 0, False
        while i < len(fqns) and time.monotonic() < deadline:
            trial = without(cur, set(fqns[i : i + chunk]))
            if _fails(strategy, options, trial, exc.invariant):
                cur, fqns, removed = trial, fqns[:i] + fqns[i + chunk :], True
            else:
                i += chunk
        if not removed:
            chunk //= 2
    while len(cur) > 1 and not cur[-1].items and _fails(strategy, options, cur[:-1], exc.invariant):
        cur = cur[:-1]
    try:
        check_plans(strategy, cur, options)
    except ConformanceError as small:
        small.__notes__ = []
        return small
    return exc  # pragma: no cover - the shrunk workload always fails


def _leaves(group: BaseException) -> list[BaseException]:
    if isinstance(group, BaseExceptionGroup):
        return [leaf for e in group.exceptions for leaf in _leaves(e)]
    return [group]


def conformance_test(strategy: Any, options: Mapping[str, Any] | None = None, **settings: Any) -> Callable[[], None]:
    """A ready-made test function, for one line at module level of a test file::

        test_my_strategy_conforms = conformance_test(my_strategy, {"mode": "fast"})

    :param settings: keyword arguments of :func:`check_strategy`.
    """

    def test() -> None:
        check_strategy(strategy, options, **settings)

    test.__doc__ = f"{strategy!r} honours dcplan's strategy contract (dcplan.testing.kit)"
    return test


# ------------------------------------------------------------------ hooks in one process
def save_and_load(
    state_dict: dict[str, Any],
    path: str | os.PathLike[str],
    *,
    plugins: Sequence[Any] = (),
    load_into: dict[str, Any] | None = None,
    entry_points: bool = True,
    **config: Any,
) -> tuple[Any, Any, dict[str, Any]]:
    """Save ``state_dict`` with ``dcp.save`` and load it back with ``dcp.load``, in this process.

    For testing hook plugins without processes: DCP runs the whole protocol in
    one process when no process group is initialised (this process is the
    coordinator), so every hook runs. ``plugins`` are registered on a fresh
    plugin manager next to the installed ones.

    :param state_dict: what to save.
    :param path: the checkpoint directory.
    :param plugins: plugin objects (modules, classes, instances with ``@dcplan.hookimpl``
        methods), or ``(name, plugin)`` pairs.
    :param load_into: the state dict to load into; default: a copy of ``state_dict``
        with every tensor zeroed.
    :param entry_points: also load the installed plugins (their strategies).
    :param config: :class:`dcplan.Config` keys for both planners, e.g. ``strategy="torch"``.
    :returns: ``(save_planner, load_planner, loaded_state_dict)``.
    """
    import warnings

    import torch
    import torch.distributed.checkpoint as dcp

    from dcplan.load.planner import LoadPlanner
    from dcplan.manager import DcplanPluginManager
    from dcplan.save.planner import SavePlanner

    named = []
    for n, plugin in enumerate(plugins):
        if isinstance(plugin, tuple):
            named.append(plugin)
        else:
            named.append((f"{getattr(plugin, '__name__', type(plugin).__name__)}-{n}", plugin))
    pm = DcplanPluginManager(entry_points=entry_points, extra_plugins=named)
    if load_into is None:
        load_into = copy.deepcopy(state_dict)

        def _zero(d: Any) -> None:
            for v in d.values() if isinstance(d, dict) else []:
                if isinstance(v, torch.Tensor):
                    v.zero_()
                else:
                    _zero(v)

        _zero(load_into)
    save_planner = SavePlanner(plugin_manager=pm, **config)
    load_planner = LoadPlanner(plugin_manager=pm, **config)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*single process.*")
        dcp.save(state_dict, checkpoint_id=os.fspath(path), planner=save_planner)
        dcp.load(load_into, checkpoint_id=os.fspath(path), planner=load_planner)
    return save_planner, load_planner, load_into
