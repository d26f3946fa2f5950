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
    "check_strategy",
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
    "metadata_validates": "dcplan.save.metadata.build_global_plan and validate_global_plan accept the result",
    "report": "dcplan.save.report.build_report produces a balance report that accounts for every byte",
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


def check_plans(
    strategy: Any, plans: Sequence[Any], options: Mapping[str, Any] | None = None, *, name: str | None = None
) -> Any:
    """Check one workload in-process; return the :class:`dcplan.save.report.PlanReport`.

    :param strategy: a strategy function, a :class:`dcplan.Strategy` or a registered name.
    :param plans: one local ``SavePlan`` per rank (they are copied, never changed).
    :param options: strategy options (defaults of a :class:`dcplan.Strategy` apply).
    :raises ConformanceError: naming the first broken invariant.
    """
    from dcplan.compat import SavePlan
    from dcplan.save.local import item_nbytes
    from dcplan.save.metadata import build_global_plan
    from dcplan.save.report import build_report
    from dcplan.save.validate import validate_global_plan

    sname, func, opts = _resolve(strategy, options, name)
    original = [copy.deepcopy(p) for p in plans]
    given = [copy.deepcopy(p) for p in plans]
    arg = list(given)
    world = len(original)

    result = _run(func, arg, opts, sname)

    # -- no_mutation
    if len(arg) != world or any(a is not g for a, g in zip(arg, given)):
        raise ConformanceError("no_mutation", "the list of plans it was given was changed", original, sname)
    for rank, (now, before) in enumerate(zip(given, original)):
        if now.items != before.items:
            raise ConformanceError(
                "no_mutation",
                f"rank {rank}'s input plan was changed in place (it had {len(before.items)} item(s), now "
                f"{len(now.items)}); build new plans with dataclasses.replace / dcplan.compat.replace_plan",
                original,
                sname,
            )
        if now.planner_data != before.planner_data or now.storage_data != before.storage_data:
            raise ConformanceError(
                "no_mutation", f"rank {rank}'s input planner_data/storage_data was changed in place", original, sname
            )

    # -- returns_plans
    if not isinstance(result, (list, tuple)):
        raise ConformanceError("returns_plans", f"it returned {type(result).__name__}, not a list", original, sname)
    if len(result) != world:
        raise ConformanceError(
            "returns_plans", f"it returned {len(result)} plan(s) for {world} rank(s)", original, sname
        )
    for rank, p in enumerate(result):
        if not isinstance(p, SavePlan):
            raise ConformanceError(
                "returns_plans", f"element {rank} is a {type(p).__name__}, not a SavePlan", original, sname
            )

    # -- holders of every input item
    holders: dict[tuple[str, tuple[int, ...]], list[int]] = {}
    first: dict[tuple[str, tuple[int, ...]], Any] = {}
    by_rank_fqn: list[dict[str, list[Any]]] = []
    for rank, p in enumerate(original):
        idx: dict[str, list[Any]] = {}
        for item in p.items:
            k = _key(item)
            holders.setdefault(k, [])
            if rank not in holders[k]:
                holders[k].append(rank)
            first.setdefault(k, item)
            idx.setdefault(item.index.fqn, []).append(item)
        by_rank_fqn.append(idx)

    # -- holder_only / item_intact; collect who writes which piece of which input item
    pieces: dict[tuple[str, tuple[int, ...]], list[tuple[int, Any]]] = {k: [] for k in holders}
    for rank, p in enumerate(result):
        for item in p.items:
            fqn = item.index.fqn
            ch = _chunk(item)
            container = None
            for cand in by_rank_fqn[rank].get(fqn, ()):
                cch = _chunk(cand)
                if ch is None and cch is None and _key(cand) == _key(item):
                    container = cand
                    break
                if ch is not None and cch is not None and _contains(cch, ch):
                    container = cand
                    break
            full = tuple(item.tensor_data.size) if item.tensor_data is not None else None
            if container is None:
                others = sorted(
                    {
                        r
                        for r, idx in enumerate(by_rank_fqn)
                        for cand in idx.get(fqn, ())
                        if (ch is None and _chunk(cand) is None) or (
                            ch is not None and _contains(_chunk(cand) or ((), ()), ch)
                        )
                    }
                )
                what = _fmt_chunk(fqn, ch, full)
                if others:
                    raise ConformanceError(
                        "holder_only",
                        f"rank {rank} writes {what}, which it does not hold (holders: ranks {others})",
                        original,
                        sname,
                    )
                raise ConformanceError(
                    "holder_only", f"rank {rank} writes {what}, which no rank holds", original, sname
                )
            ck = _key(container)
            if item.type != container.type and not (ch is not None and ch != _chunk(container)):
                raise ConformanceError(
                    "item_intact",
                    f"rank {rank} writes {_fmt_chunk(fqn, ch)} as {item.type.name}; the input item is "
                    f"{container.type.name}",
                    original,
                    sname,
                )
            if ch is not None:
                td, ctd = item.tensor_data, container.tensor_data
                if td.properties.dtype != ctd.properties.dtype or tuple(td.size) != tuple(ctd.size):
                    raise ConformanceError(
                        "item_intact",
                        f"rank {rank} writes {_fmt_chunk(fqn, ch)} as {td.properties.dtype} {tuple(td.size)}; "
                        f"the input item is {ctd.properties.dtype} {tuple(ctd.size)}",
                        original,
                        sname,
                    )
            pieces[ck].append((rank, ch))

    # -- exactly_once
    for k in sorted(pieces, key=lambda t: (t[0], t[1])):
        got = pieces[k]
        item = first[k]
        full = tuple(item.tensor_data.size) if item.tensor_data is not None else None
        what = _fmt_chunk(k[0], _chunk(item), full)
        if not got:
            raise ConformanceError(
                "exactly_once", f"{what} is dropped: no rank writes it (holders: ranks {holders[k]})", original, sname
            )
        cch = _chunk(item)
        if cch is None:
            if len(got) > 1:
                ranks = sorted(r for r, _ in got)
                raise ConformanceError("exactly_once", f"{what} is written {len(got)} times, by ranks {ranks}",
                                       original, sname)
            continue
        for i in range(len(got)):
            for j in range(i):
                (ri, ci), (rj, cj) = got[i], got[j]
                if ci == cj or _overlap(ci, cj):
                    if ci == cj:
                        detail = f"{_fmt_chunk(k[0], ci, full)} is written twice: by rank {rj} and rank {ri}"
                    else:
                        detail = (
                            f"{_fmt_chunk(k[0], cj)} (rank {rj}) and {_fmt_chunk(k[0], ci)} (rank {ri}) overlap: "
                            "those elements are written twice"
                        )
                    raise ConformanceError("exactly_once", detail, original, sname)
        volume = sum(math.prod(c[1]) for _, c in got)
        total = math.prod(cch[1])
        if volume != total:
            raise ConformanceError(
                "exactly_once",
                f"{what}: the written pieces cover {volume} of its {total} elements (split pieces must tile the "
                "chunk exactly)",
                original,
                sname,
            )

    # -- planner_data
    for rank, (out, inp) in enumerate(zip(result, original)):
        if out.planner_data != inp.planner_data:
            raise ConformanceError(
                "planner_data",
                f"rank {rank}'s planner_data changed from {inp.planner_data!r} to {out.planner_data!r}; keep it "
                "(dcplan.compat.replace_plan(plan, items=...) does)",
                original,
                sname,
            )

    # -- deterministic (in-process)
    digest = result_signature(result)
    again = _run(func, [copy.deepcopy(p) for p in original], opts, sname)
    if result_signature(again) != digest:
        raise ConformanceError(
            "deterministic",
            "two calls on the same input returned different plans (random choices? iteration over a set "
            "or over id()-keyed dicts? sort by item key and break ties by rank)",
            original,
            sname,
        )

    # -- metadata_validates
    global_plan, metadata, errors = build_global_plan(list(result))
    if not errors:
        errors = validate_global_plan(global_plan, metadata)
    if errors:
        raise ConformanceError("metadata_validates", "; ".join(errors[:5]), original, sname)

    # -- report
    try:
        report = build_report(original, list(result), sname)
    except Exception as exc:  # noqa: BLE001
        raise ConformanceError("report", f"build_report raised {type(exc).__name__}: {exc}", original, sname) from exc
    unique = sum(item_nbytes(first[k]) for k in first)
    if len(report.bytes_per_rank) != world or report.total_bytes != unique:
        raise ConformanceError(
            "report",
            f"the report counts {report.total_bytes} B on {len(report.bytes_per_rank)} rank(s); the workload has "
            f"{unique} unique B on {world} rank(s)",
            original,
            sname,
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
        digests = [result_signature(func([copy.deepcopy(p) for p in plans], **opts)) for plans in batch]
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
    mine = [result_signature(func([copy.deepcopy(p) for p in plans], **opts)) for plans in batch]
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
    :returns: a :class:`ConformanceResult`.
    :raises ConformanceError: naming the broken invariant, on a minimal workload.
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
    )
    @given(workloads(max_world_size=max_world_size))
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
    return ConformanceResult(
        strategy=sname,
        examples=counter[0],
        hash_seed_workloads=len(batch) if hash_seeds else 0,
        hash_seeds=tuple(hash_seeds),
        last_report=last[0],
    )


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
