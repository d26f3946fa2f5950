"""Step 1b of a save, on every rank: agree which ranks send their plan, before the gather.

Replicated layouts (DDP, HSDP, TP x PP x DP) have few distinct plans among many
ranks. Every rank encodes its plan (:mod:`dcplan.save.wire`), digests the
encoding together with its flattening mapping and agreement tuple, and the
ranks ``all_gather_object`` those 16-byte digests (about 40 bytes per rank on
the wire). A rank whose digest equals a lower rank's then sends only that
rank's number; the coordinator rebuilds its plan from the lower rank's
(:func:`dcplan.save.wire.unpack_gathered`). Gathered bytes then scale with the
number of distinct plans, on the first save already.

The collective runs on the planner's process group (``SavePlanner(process_group=)``,
default: the default group) and only when it is known to be the group the
running ``dcp.save`` gathers on (:func:`dcplan.compat.dcp_save_context`): a
different or unknown group means every rank sends its full (compact) plan.
Every rank takes part in the collective even when its local planning failed
(it sends a failure marker), so no rank waits for a peer that has given up;
torch's own gather then reports the failure everywhere.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import attrs

log = logging.getLogger("dcplan")

__all__ = ["ExchangePlan", "resolve", "exchange_digests", "refs_from"]

#: what a rank whose local planning failed contributes to the exchange
FAILED = b"\x00failed"


@attrs.frozen
class ExchangePlan:
    """How this rank takes part in a save's planning collectives.

    :param group: the process group of the digest exchange (``None``: the default group).
    :param exchange: whether to exchange digests (the group is known to be DCP's).
    :param compact: whether to send the compact plan form at all (the storage
        writer ignores items before the gather).
    :param why: a reason when ``exchange`` is off.
    """

    group: Any = None
    exchange: bool = False
    compact: bool = False
    why: str = ""


def _same_group(a: Any, b: Any) -> bool:
    import torch.distributed as dist

    world = dist.group.WORLD
    return (world if a is None else a) is (world if b is None else b)


def resolve(planner_group: Any, context: tuple[Any, bool] | None) -> ExchangePlan:
    """Decide, from the planner's group and the running ``dcp.save``, what to do.

    Every rank of one ``dcp.save`` call sees the same ``context`` group, so
    ranks reach the same decision as long as their planners got the same
    ``process_group``.
    """
    import torch.distributed as dist

    if context is None:
        return ExchangePlan(why="no dcp.save with collectives on the stack")
    dcp_group, compact = context
    if not (dist.is_available() and dist.is_initialized()):
        return ExchangePlan(why="torch.distributed is not initialized")
    if not compact:
        return ExchangePlan(group=dcp_group, why="the storage writer may read plan items before the gather")
    if not _same_group(planner_group, dcp_group):
        return ExchangePlan(
            group=dcp_group,
            compact=True,
            why="the planner's process_group is not the one dcp.save uses (pass the same to both)",
        )
    return ExchangePlan(group=dcp_group, exchange=True, compact=True)


def exchange_digests(digest: bytes, group: Any) -> list[bytes]:
    """``all_gather_object`` of this rank's digest (or :data:`FAILED`) on ``group``."""
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, digest, group=group)
    return [d if isinstance(d, bytes) else FAILED for d in out]


def refs_from(digests: Sequence[bytes]) -> list[int | None]:
    """Per rank: the lowest rank with the same digest, or ``None`` (send the plan).

    A rank's digest is its encoded items' (16 bytes) followed by its mapping and
    agreement's (:func:`meta_digest`, 16 bytes).
    """
    first: dict[bytes, int] = {}
    refs: list[int | None] = []
    for r, d in enumerate(digests):
        if d == FAILED:
            refs.append(None)
            continue
        q = first.setdefault(d, r)
        refs.append(None if q == r else q)
    return refs


def _store_says_hit(store: Any, digests: Sequence[bytes], how: ExchangePlan) -> bool:
    """Coordinator (group rank 0) checks the persistent store; the answer is broadcast to all."""
    import torch.distributed as dist

    flag: list[Any] = [False]
    if dist.get_rank(how.group) == 0:
        try:
            flag[0] = bool(store.check(digests))
        except Exception as exc:  # noqa: BLE001 - a broken store is a miss, never a hang
            log.warning("dcplan plan store: check failed (%s: %s); planning from scratch", type(exc).__name__, exc)
            flag[0] = False
    src = 0 if how.group is None else dist.get_global_rank(how.group, 0)
    dist.broadcast_object_list(flag, src=src, group=how.group)
    return bool(flag[0])


def send_plan(plan: Any, how: ExchangePlan, failed: bool = False, store: Any = None) -> Any:
    """What this rank returns from ``create_local_plan`` (``plan`` carries its ``RankPayload``).

    With ``failed`` (local planning raised), only takes part in the digest
    exchange, so that peers do not wait for it, and returns ``None``.

    ``store``: this rank's :class:`dcplan.save.store.PlanStore` (``plan_cache_dir``)
    or ``None``. When every rank has one, the coordinator checks it against the
    exchanged digests and, on a match, every rank sends only a marker. The
    digests are left in ``store.digests`` for the coordinator to record the plan.
    """
    from dcplan.save import wire

    if not how.compact:
        return None if failed else plan
    if failed:
        if how.exchange:
            exchange_digests(FAILED, how.group)
        return None
    try:
        encoded = wire.encode_items(plan.items)
        payload = plan.planner_data
        meta = meta_digest(payload) if how.exchange else b""
        digest = encoded.digest() + meta if how.exchange else FAILED
    except BaseException:
        if how.exchange:
            exchange_digests(FAILED, how.group)
        raise
    if not how.exchange:
        return wire.pack_local(plan, payload, encoded, None)
    import torch.distributed as dist

    gathered = exchange_digests(digest + (b"s" if store is not None else b"-"), how.group)
    digests = [d[:-1] if d != FAILED else FAILED for d in gathered]
    stores_on = all(d != FAILED and d[-1:] == b"s" for d in gathered)
    if store is not None:
        store.digests = digests
    if stores_on and _store_says_hit(store, digests, how):
        return wire.pack_local(plan, payload, None, None, stored=True)
    me = dist.get_rank(how.group)
    refs, meta_refs = plan_refs(digests)
    return wire.pack_local(plan, payload, encoded, refs[me], meta_ref=meta_refs[me])


def plan_refs(digests: Sequence[bytes]) -> tuple[list[int | None], list[int | None]]:
    """Per rank: the rank whose whole plan it refers to, and the rank whose mapping and agreement."""
    return refs_from(digests), refs_from([d if d == FAILED else d[16:] for d in digests])


def meta_digest(payload: Any) -> bytes:
    """16 bytes for a payload's mapping and agreement (what ranks usually share)."""
    import hashlib
    import pickle

    return hashlib.blake2b(pickle.dumps((payload.mapping, payload.agreement), protocol=4), digest_size=16).digest()
