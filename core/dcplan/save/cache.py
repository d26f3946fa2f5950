"""Save-plan caching that is correct, agreed across ranks, and cheap on a hit.

Enable it with ``plan_cache = true`` (config, ``DCPLAN_PLAN_CACHE=1`` or
``SavePlanner(plan_cache=True)``); ``plan_cache_size`` bounds the entries. It
is off by default.

What is cached
==============

Every rank fingerprints its full local plan: every item's fqn, offsets, chunk
sizes, global size, tensor properties (dtype...), item type, recorded bytes
size and index hint, the flattening mapping, the planner's agreement
(strategy, options, plugin set), its class and its whole config. When the
fingerprint equals the one of a plan this rank holds from an earlier
successful save, the rank sends a small "unchanged" marker (an empty
``SavePlan`` whose ``planner_data`` carries a :class:`CacheMsg`) instead of its
plan. This works on every torch: the marker is ours; ``SavePlan.usable``
(2.7+) is only set as a courtesy.

The coordinator keeps, per world size, an LRU of ``plan_cache_size`` *entries*
keyed by namespace (``cache_namespace``; by default a digest of every rank's
top-level state-dict keys, so model and optimizer saves get separate entries).
An entry holds every rank's local plan and fingerprint, the global plan, the
metadata and the plan report under a fresh, globally unique *generation*.
Ranks keep the final plans they received, by generation.

* **Hit**: every rank sent a marker naming one entry of this world size, at
  its own position, with the same fingerprint. The coordinator reuses the
  global plan, metadata and report without running dedup, metadata or
  validation, and scatters markers back; each rank reuses its cached final
  plan with the ``storage_data`` the storage writer assigned this time (so a
  new checkpoint path is fine).
* **Miss**: anything else (a rank changed, new namespace or world size, a
  rank without an entry). The coordinator rebuilds the full local plans (the
  changed ranks sent theirs; unchanged ones are found by fingerprint in its
  entries), replans from scratch, and only then commits a new entry. Ranks
  whose final plan did not change get a marker back.

Agreement and failures
======================

* Hit or miss is decided by the coordinator alone and scattered to every rank,
  so ranks cannot disagree; a marker is resolved by content (fingerprint), not
  by trust.
* Entries are written only after the global plan has fully succeeded
  (dedup, metadata, validation, report); a rank commits its entry when it
  receives the coordinator's answer in ``finish_plan``.
* A save that fails between a rank's local plan and its ``finish_plan`` leaves
  a flag behind; the next save on that rank drops its entries and sends its
  full plan. Every answer of the coordinator lists the generations it still
  holds for that world size and ranks drop the others, so a rank only sends a
  marker that its coordinator can resolve.
* If one cannot be resolved anyway (the coordinator process restarted, or a
  process saves through several process groups under one namespace and meets
  a new coordinator), the save fails before any byte is written with
  :class:`PlanCacheError`, the cache is reset and a retry succeeds. A process
  that has answered to several coordinators under one namespace sends its plan
  along with its marker from then on, so this happens at most once.
* A plan whose *write* failed is still a correct plan for that structure, so
  it stays cached.

Limits
======

* Stores are per process, keyed by the default process group's world size and
  rank (or injected, see :class:`PlanCache`). A process that saves through
  several process groups should give each its own ``cache_namespace``.
* A cached final plan keeps its items; only ``storage_data`` is refreshed from
  the storage writer's ``prepare_global_plan`` of this save. Writers whose
  ``storage_data`` depends on the items themselves should not use the cache.
* Every rank still builds and fingerprints its local plan on each save (that
  is how it knows nothing changed); the saving is on the coordinator and in
  what is gathered and scattered.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import attrs

from dcplan import compat
from dcplan.compat import ChunkStorageMetadata, Metadata, SavePlan, TensorWriteData, WriteItem
from dcplan.errors import PlanCacheError  # re-exported (public name of this module)

if TYPE_CHECKING:  # pragma: no cover
    from dcplan.config import Config

__all__ = [
    "PlanCache",
    "CacheStore",
    "CacheMsg",
    "CacheAck",
    "PlanCacheError",
    "plan_fingerprint",
    "structure_fingerprint",
    "default_namespace",
    "get_store",
    "clear_plan_caches",
]

log = logging.getLogger("dcplan")


# ---------------------------------------------------------------- fingerprints
def _extra_fields(cls: type, known: set[str]) -> tuple[str, ...]:
    return tuple(sorted(f.name for f in dataclasses.fields(cls) if f.name not in known))


# Fields that this torch has beyond the ones handled explicitly (future-proof:
# they are fingerprinted by repr).
_ITEM_EXTRA = _extra_fields(WriteItem, {"index", "type", "tensor_data", "bytes_io_data"})
_TD_EXTRA = _extra_fields(TensorWriteData, {"chunk", "properties", "size"})
_CHUNK_EXTRA = _extra_fields(ChunkStorageMetadata, {"offsets", "sizes"})
_props_repr: dict[Any, str] = {}


def _properties_key(props: Any) -> str:
    """``repr(TensorProperties)``, memoised on its field values (dtype, layout, ...)."""
    try:
        key = (type(props), tuple(vars(props).values()))
        text = _props_repr.get(key)
    except TypeError:  # unhashable or no __dict__
        return repr(props)
    if text is None:
        text = repr(props)
        if len(_props_repr) < 4096:
            _props_repr[key] = text
    return text


def _item_key(item: WriteItem) -> str:
    idx = item.index
    head = f"{idx.fqn!r}|{tuple(idx.offset) if idx.offset is not None else None}|{idx.index}|{item.type.value}"
    td = item.tensor_data
    if td is None:
        text = f"{head}|b{compat.bytes_item_size(item)}"
    else:
        c = td.chunk
        chunk = "-" if c is None else f"{tuple(c.offsets)}{tuple(c.sizes)}"
        if c is not None and _CHUNK_EXTRA:
            chunk += repr([getattr(c, f) for f in _CHUNK_EXTRA])
        text = f"{head}|{chunk}|{tuple(td.size)}|{_properties_key(td.properties)}"
        if _TD_EXTRA:
            text += repr([getattr(td, f) for f in _TD_EXTRA])
    if _ITEM_EXTRA:
        text += repr([getattr(item, f) for f in _ITEM_EXTRA])
    return text


def _digest(parts: Iterable[str]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        h.update(part.encode("utf-8", "surrogatepass"))
        h.update(b"\x1e")
    return h.hexdigest()


def structure_fingerprint(plan: SavePlan, *extra: Any) -> str:
    """A digest of a plan's structure: every item (fqn, offsets, chunk, global
    size, tensor properties, type, bytes size, index hint), ``planner_data``,
    ``storage_data`` and ``extra`` values (by ``repr``). Independent of
    ``PYTHONHASHSEED``.
    """
    head = [repr(plan.planner_data), repr(plan.storage_data), *(repr(e) for e in extra)]
    return _digest([*head, *map(_item_key, plan.items)])


#: the old name of :func:`structure_fingerprint`
plan_fingerprint = structure_fingerprint


def default_namespace(planner: Any) -> str:
    """The cache namespace: config's ``cache_namespace``, else a digest of the
    sorted top-level keys of the state dict being saved (model vs optimizer)."""
    ns = getattr(planner.config, "cache_namespace", None)
    if ns:
        return str(ns)
    sd = getattr(planner, "original_state_dict", None)
    if sd is None:
        sd = getattr(planner, "state_dict", None) or {}
    keys = sorted(repr(k) for k in sd)
    return f"auto:{len(keys)}:{_digest(keys)[:12]}"


# ---------------------------------------------------------------- messages
Ref = tuple[str, int]  # (generation, position of the rank in that save)


@attrs.frozen
class CacheMsg:
    """A rank's cache message (in ``RankPayload.cache``).

    :param fp: fingerprint of the rank's full local plan.
    :param ns: the rank's own namespace (the coordinator combines them).
    :param unchanged: the plan's items were left out: one of ``have`` holds a
        plan with fingerprint ``fp``.
    :param have: ``(generation, position)`` of every entry this rank holds and
        could reuse.
    :param full: the plan's items were sent anyway (always when changed; also
        when unchanged but the rank has answered to several coordinators, so a
        coordinator that cannot resolve ``have`` can still plan).
    """

    fp: str
    ns: str = ""
    unchanged: bool = False
    have: tuple[Ref, ...] = ()
    full: bool = True


@attrs.frozen
class CacheAck:
    """The coordinator's answer to one rank (in the scattered plan's ``planner_data``).

    :param gen: the generation the rank records its final plan under.
    :param world: the save's world size.
    :param pos: the rank's position in the save.
    :param live: the generations the coordinator holds for ``world`` after this
        save (``None``: unchanged); the rank drops its other entries of ``world``.
    :param reuse: when the plan's items were left out: the ``(generation,
        position)`` of the rank's entry whose final plan is still right.
    """

    gen: str
    world: int
    pos: int
    live: tuple[str, ...] | None = None
    reuse: Ref | None = None


# ---------------------------------------------------------------- store
@attrs.define
class _RankEntry:
    gen: str
    world: int
    pos: int
    fp: str
    final: SavePlan
    tag: str | None  # the explicit cache_namespace it was made under


@attrs.define
class _CoordEntry:
    gen: str
    fps: tuple[str, ...]
    local_plans: tuple[SavePlan, ...]
    global_plan: list[SavePlan]
    global_fps: tuple[str, ...]
    metadata: Metadata
    report: Any


@attrs.define
class _Pending:
    """What a rank remembers between ``create_local_plan`` and ``finish_plan``."""

    store: CacheStore
    fp: str
    tag: str | None
    have: dict[Ref, _RankEntry]


class CacheStore:
    """The plan-cache state of one process (or of one simulated rank in tests).

    Rank side: the final plans this rank received, by generation. Coordinator
    side: per world size, an LRU of entries by namespace.
    """

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.id = os.urandom(4).hex()
        self._counter = 0
        self.rank: OrderedDict[str, _RankEntry] = OrderedDict()
        self.coord: dict[int, OrderedDict[str, _CoordEntry]] = {}
        self.in_flight = False
        #: per explicit namespace (or None), the other coordinators this rank got answers from
        self.issuers: dict[str | None, set[str]] = {}
        self.stats: dict[str, int] = {"hits": 0, "misses": 0, "markers_sent": 0, "plans_sent": 0, "resets": 0}

    def new_gen(self) -> str:
        self._counter += 1
        return f"{self.id}.{self._counter}"

    def issued(self, gen: str) -> bool:
        """Whether this store's coordinator side issued ``gen``."""
        return gen.split(".", 1)[0] == self.id

    def find(self, gen: str) -> _CoordEntry | None:
        for slots in self.coord.values():
            for entry in slots.values():
                if entry.gen == gen:
                    return entry
        return None

    def live(self, world: int) -> tuple[str, ...]:
        return tuple(sorted(e.gen for e in self.coord.get(world, {}).values()))

    def clear(self, forget_issuers: bool = True) -> None:
        with self.lock:
            self.rank.clear()
            self.coord.clear()
            self.in_flight = False
            if forget_issuers:
                self.issuers.clear()

    def __repr__(self) -> str:
        worlds = {w: len(s) for w, s in sorted(self.coord.items())}
        return f"CacheStore(id={self.id}, rank_entries={len(self.rank)}, coordinator_entries={worlds})"


_registry_lock = threading.Lock()
_registry: dict[tuple[int, int], CacheStore] = {}


def _dist_scope() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return (dist.get_world_size(), dist.get_rank())
    return (1, 0)


def get_store(scope: tuple[int, int] | None = None) -> CacheStore:
    """The process-wide store for ``scope`` = (world size, rank) of the default
    process group (``(1, 0)`` without one)."""
    scope = _dist_scope() if scope is None else scope
    with _registry_lock:
        store = _registry.get(scope)
        if store is None:
            store = _registry[scope] = CacheStore()
        return store


def clear_plan_caches() -> None:
    """Forget every process-wide plan cache (all scopes)."""
    with _registry_lock:
        stores = list(_registry.values())
        _registry.clear()
    for s in stores:
        s.clear()


def _copy_plan(plan: SavePlan) -> SavePlan:
    """A plan whose item list can be mutated without touching the cache (items are frozen)."""
    return dataclasses.replace(plan, items=list(plan.items))


def _copy_metadata(md: Metadata) -> Metadata:
    """A metadata whose attributes and top-level dicts can be mutated without touching the cache."""
    changes: dict[str, Any] = {"state_dict_metadata": dict(md.state_dict_metadata)}
    if isinstance(md.planner_data, dict):
        changes["planner_data"] = dict(md.planner_data)
    return dataclasses.replace(md, **changes)


def _marker_plan(planner_data: Any) -> SavePlan:
    return compat.replace_plan(SavePlan([]), planner_data=planner_data, usable=False)


# ---------------------------------------------------------------- the cache
class PlanCache:
    """A planner's view of the plan cache; called by :class:`dcplan.SavePlanner`.

    :param config: the planner's config (``plan_cache_size``, ``cache_namespace``).
    :param store: a specific :class:`CacheStore` (tests simulating several ranks
        in one process give each its own); default: the process-wide store of
        ``scope``.
    :param scope: ``(world_size, rank)`` picking the process-wide store; default:
        the default process group's.

    After each save, ``outcome`` says what happened on the coordinator
    (``"hit"`` or ``"miss"``) and ``sent`` whether this rank sent a
    ``"marker"`` or its ``"plan"``.
    """

    def __init__(self, config: Config, store: CacheStore | None = None, scope: tuple[int, int] | None = None) -> None:
        self.config = config
        self.size = int(config.plan_cache_size)
        self._store = store
        self._scope = scope
        self.outcome: str | None = None
        self.sent: str | None = None
        self._pending: _Pending | None = None
        self._msgs: list[CacheMsg] | None = None

    @classmethod
    def for_config(cls, config: Config) -> PlanCache:
        return cls(config)

    def __getstate__(self) -> dict[str, Any]:
        # a planner pickled to another process (async_save) uses that process's store
        state = dict(self.__dict__)
        state["_pending"] = None
        return state

    @property
    def store(self) -> CacheStore:
        return self._store if self._store is not None else get_store(self._scope)

    def clear(self) -> None:
        """Drop this process's cached plans (the store of this planner)."""
        self.store.clear()

    def _fingerprint(self, planner: Any, plan: SavePlan) -> str:
        cls = type(planner)
        extra = (
            f"{cls.__module__}.{cls.__qualname__}",
            planner.agreement(),
            sorted((k, repr(v)) for k, v in self.config.to_dict().items() if k != "cache_namespace"),
            bool(getattr(planner, "flatten_state_dict", True)),
            bool(getattr(planner, "flatten_sharded_tensors", True)),
        )
        return structure_fingerprint(plan, *extra)

    # -- every rank: after the local plan ------------------------------
    def local_step(self, planner: Any, plan: SavePlan) -> tuple[SavePlan, CacheMsg]:
        """Return the plan to send (full, or an empty marker) and the cache message."""
        store = self.store
        is_coord = bool(getattr(planner, "is_coordinator", False))
        tag = self.config.cache_namespace
        ns = default_namespace(planner)
        fp = self._fingerprint(planner, plan)
        with store.lock:
            if store.in_flight:
                # the previous save stopped between its local plan and finish_plan:
                # the coordinator may hold other generations now; start over.
                log.info("dcplan plan cache: the previous save did not finish on this rank; dropping its entries")
                store.rank.clear()
                store.stats["resets"] += 1
            store.in_flight = True
            # only entries this save's coordinator can know: our own when we coordinate,
            # another process's otherwise (rank-local saves coordinate themselves)
            have = {
                (e.gen, e.pos): e
                for e in store.rank.values()
                if e.tag == tag and store.issued(e.gen) == is_coord and (not is_coord or store.find(e.gen))
            }
            unchanged = any(e.fp == fp for e in have.values())
            # a process that answered to several coordinators under one namespace cannot tell which one
            # this save has: it sends its plan along with the marker (the coordinator may still hit)
            full = not unchanged or (not is_coord and len(store.issuers.get(tag, ())) > 1)
            store.stats["plans_sent" if full else "markers_sent"] += 1
        self._pending = _Pending(store, fp, tag, have)
        msg = CacheMsg(fp=fp, ns=ns, unchanged=unchanged, have=tuple(sorted(have)), full=full)
        self.sent = "plan" if full else "marker"
        if full:
            return plan, msg
        return _marker_plan(None), msg

    # -- coordinator ---------------------------------------------------
    def _collect(self, payloads: Sequence[Any]) -> list[CacheMsg]:
        msgs = [getattr(p, "cache", None) for p in payloads]
        bad = [r for r, m in enumerate(msgs) if not isinstance(m, CacheMsg)]
        if bad:
            from dcplan.errors import PlanMismatchError

            raise PlanMismatchError(
                f"dcplan: rank(s) {bad} sent no plan-cache message while the coordinator has plan_cache on; "
                "set plan_cache identically on every rank (config, DCPLAN_PLAN_CACHE)"
            )
        return msgs  # type: ignore[return-value]

    def _namespace(self, msgs: Sequence[CacheMsg]) -> str:
        if self.config.cache_namespace:
            return str(self.config.cache_namespace)
        return "auto:" + _digest([m.ns for m in msgs])[:16]

    def global_step(
        self, planner: Any, all_plans: Sequence[SavePlan], payloads: Sequence[Any]
    ) -> tuple[list[SavePlan], list[SavePlan], Metadata, Any] | None:
        """On a hit: ``(delta, global_plan, metadata, report)`` from the cache; else ``None``.

        The planner publishes the returned report (once per save, hit or miss).
        """
        msgs = self._collect(payloads)
        self._msgs = msgs
        world = len(all_plans)
        ns = self._namespace(msgs)
        store = self.store
        found: _CoordEntry | None = None
        with store.lock:
            slots = store.coord.get(world)
            if slots is not None and all(m.unchanged for m in msgs):
                order = ([ns] if ns in slots else []) + [k for k in reversed(slots) if k != ns]
                for key in order:
                    entry = slots[key]
                    if all((entry.gen, r) in m.have and entry.fps[r] == m.fp for r, m in enumerate(msgs)):
                        found = entry
                        slots.move_to_end(key)
                        break
            store.stats["hits" if found is not None else "misses"] += 1
        if found is None:
            self.outcome = "miss"
            return None
        self.outcome = "hit"
        gen = found.gen
        delta = [_marker_plan(CacheAck(gen=gen, world=world, pos=r, reuse=(gen, r))) for r in range(world)]
        return delta, [_copy_plan(p) for p in found.global_plan], _copy_metadata(found.metadata), found.report

    def full_local_plans(
        self, planner: Any, all_plans: Sequence[SavePlan], payloads: Sequence[Any]
    ) -> list[SavePlan]:
        """The full local plans (``planner_data`` = mapping) for a replan.

        Unchanged ranks' plans come from the coordinator's entries, by
        fingerprint; one it cannot find resets the cache and raises
        :class:`PlanCacheError` (nothing is written).
        """
        msgs = self._msgs if self._msgs is not None and len(self._msgs) == len(all_plans) else self._collect(payloads)
        store = self.store
        out: list[SavePlan] = []
        with store.lock:
            for r, (plan, payload, m) in enumerate(zip(all_plans, payloads, msgs)):
                if m.full:
                    out.append(compat.replace_plan(plan, planner_data=payload.mapping))
                    continue
                local = None
                for gen, pos in m.have:
                    src = store.find(gen)
                    if src is not None and 0 <= pos < len(src.fps) and src.fps[pos] == m.fp:
                        local = src.local_plans[pos]
                        break
                if local is None:
                    store.clear(forget_issuers=False)
                    store.stats["resets"] += 1
                    raise PlanCacheError(
                        f"dcplan plan cache: rank {r} sent an 'unchanged' marker for a plan this coordinator "
                        f"does not hold (entries {list(m.have)}). This happens when the coordinator process "
                        "restarted, or when one process saves through several process groups under the same "
                        "cache namespace. Nothing was written and the plan cache was reset: retry the save, "
                        "and give each process group its own cache_namespace."
                    )
                out.append(_copy_plan(local))
        return out

    def commit_global(
        self,
        planner: Any,
        local_plans: Sequence[SavePlan],
        global_plan: Sequence[SavePlan],
        metadata: Metadata,
        report: Any = None,
    ) -> list[SavePlan]:
        """Record a successful plan (and its ``report``, returned on later hits);
        return what to scatter (markers where a rank's cached final plan is still right)."""
        msgs = self._msgs
        if msgs is None or len(msgs) != len(global_plan):
            raise PlanCacheError("dcplan plan cache: commit_global without a matching global_step (internal error)")
        world = len(global_plan)
        ns = self._namespace(msgs)
        global_fps = tuple(structure_fingerprint(p) for p in global_plan)
        store = self.store
        with store.lock:
            reuse: list[Ref | None] = []
            for r, m in enumerate(msgs):
                ref = None
                for gen, pos in m.have:
                    src = store.find(gen)
                    if src is not None and 0 <= pos < len(src.global_fps) and src.global_fps[pos] == global_fps[r]:
                        ref = (gen, pos)
                        break
                reuse.append(ref)
            entry = _CoordEntry(
                gen=store.new_gen(),
                fps=tuple(m.fp for m in msgs),
                local_plans=tuple(_copy_plan(p) for p in local_plans),
                global_plan=[_copy_plan(p) for p in global_plan],
                global_fps=global_fps,
                metadata=_copy_metadata(metadata),  # the storage writer mutates the one it gets
                report=report,
            )
            slots = store.coord.setdefault(world, OrderedDict())
            slots.pop(ns, None)
            slots[ns] = entry
            while len(slots) > self.size:
                slots.popitem(last=False)
            live = store.live(world)
        delta = []
        for r, plan in enumerate(global_plan):
            if reuse[r] is not None:
                delta.append(_marker_plan(CacheAck(entry.gen, world, r, live, reuse[r])))
            else:
                delta.append(compat.replace_plan(plan, planner_data=CacheAck(entry.gen, world, r, live, None)))
        return delta

    # -- every rank: the coordinator's answer ----------------------------
    def finish(self, planner: Any, central_plan: SavePlan) -> SavePlan:
        """Turn the scattered plan into this rank's final plan and commit the entry."""
        ack = central_plan.planner_data
        pending, self._pending = self._pending, None
        if not isinstance(ack, CacheAck):
            return central_plan
        if pending is None:
            raise PlanCacheError(
                "dcplan plan cache: finish_plan got a cached answer but this planner made no local plan; "
                "use one dcplan.SavePlanner for the whole save"
            )
        store = pending.store
        if ack.reuse is not None:
            src = pending.have.get(ack.reuse)
            if src is None:
                with store.lock:
                    store.rank.clear()
                raise PlanCacheError(
                    f"dcplan plan cache: the coordinator told this rank to reuse cached plan {ack.reuse}, which "
                    "it does not hold; the cache was reset, retry the save"
                )
            final = compat.replace_plan(src.final, storage_data=central_plan.storage_data, items=list(src.final.items))
        else:
            final = compat.replace_plan(central_plan, planner_data=None, usable=True)
        with store.lock:
            store.rank.pop(ack.gen, None)
            store.rank[ack.gen] = _RankEntry(ack.gen, ack.world, ack.pos, pending.fp, _copy_plan(final), pending.tag)
            issuer = ack.gen.split(".", 1)[0]
            if issuer != store.id:
                store.issuers.setdefault(pending.tag, set()).add(issuer)
            if ack.live is not None:
                live = set(ack.live)
                stale = [
                    g
                    for g, e in store.rank.items()
                    if e.world == ack.world and g.split(".", 1)[0] == issuer and g not in live
                ]
                for g in stale:
                    del store.rank[g]
            while len(store.rank) > 4 * self.size:
                store.rank.popitem(last=False)
            store.in_flight = False
        return final
