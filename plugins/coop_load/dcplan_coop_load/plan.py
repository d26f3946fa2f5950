"""The cooperative global load plan (coordinator only, no processes needed).

Every stored chunk (``ReadItem.storage_index``) that several ranks of one sharing
scope need becomes a *share*: one of those ranks (the *owner*) reads the whole stored
chunk once, then sends each other consumer the region it asked for. Owners are chosen
largest share first, to the consumer with the fewest bytes to read so far (private
reads included), ties to the lower rank. Shares are packed into rounds so that no
rank holds more than about ``max_in_flight`` bytes of staged and exchanged data at a
time. Each rank's final plan keeps only its private reads; the rest is its
:class:`RankSchedule` in ``planner_data[SCHEDULE_KEY]``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import attrs
import torch
from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem

from dcplan.load.strategy import load_infos, reader_marked

__all__ = ["PROXY_PREFIX", "SCHEDULE_KEY", "Piece", "RankRound", "RankSchedule", "plan_cooperative"]

#: ``planner_data`` key of a rank's :class:`RankSchedule`.
SCHEDULE_KEY = "dcplan_coop"
#: ``dest_index.fqn`` prefix of the reads an owner does for a share (never a state-dict key).
PROXY_PREFIX = "\x00dcplan-coop/"
ALIGN = 16


def aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@attrs.frozen
class Piece:
    """One consumer read item served from a share: ``uid`` names the share."""

    uid: int
    item: ReadItem
    nbytes: int  # payload bytes (0 for non-tensor items: sent with their length)


@attrs.frozen
class RankRound:
    """What one rank does in one exchange round."""

    reads: tuple[ReadItem, ...]  # proxy reads of the shares this rank owns
    send: tuple[tuple[Piece, ...], ...]  # per destination rank
    recv: tuple[tuple[Piece, ...], ...]  # per source rank
    local: tuple[Piece, ...]  # shares this rank owns and needs itself
    bytes_round: bool = False  # non-tensor items: lengths are exchanged first


@attrs.frozen
class RankSchedule:
    """A rank's part of the cooperative plan."""

    mode: str  # "coop" | "plain"
    reason: str  # why "plain" (or a summary for "coop")
    rank: int
    world: int
    collect: bool  # every rank's reader calls finish_reads: gather the load stats
    device: str = "cpu"  # transport: "cuda" (NCCL) or "cpu"
    rounds: tuple[RankRound, ...] = ()
    read_bytes: int = 0  # planned: bytes this rank reads from storage
    stored_bytes: int = 0  # planned: distinct stored bytes the load touches (all ranks)
    default_read_bytes: int = 0  # planned: what the default load would read (all ranks)


# ---------------------------------------------------------------- sizes
def _chunk_sizes(metadata: Any, index: MetadataIndex) -> tuple[int, ...] | None:
    md = metadata.state_dict_metadata.get(index.fqn)
    chunks = getattr(md, "chunks", None)
    if not chunks:
        return None
    offset = tuple(index.offset or ())
    hint = index.index
    if hint is not None and 0 <= hint < len(chunks) and tuple(chunks[hint].offsets) == offset:
        return tuple(chunks[hint].sizes)
    for chunk in chunks:
        if tuple(chunk.offsets) == offset:
            return tuple(chunk.sizes)
    return None


def dtype_of(metadata: Any, fqn: str) -> torch.dtype:
    return metadata.state_dict_metadata[fqn].properties.dtype  # type: ignore[no-any-return]


def stored_size(metadata: Any, index: MetadataIndex) -> int:
    """Bytes the reader reads for one item of this stored chunk (the file's record when known)."""
    info = (getattr(metadata, "storage_data", None) or {}).get(index)
    length = getattr(info, "length", None)
    if isinstance(length, int):
        return length
    sizes = _chunk_sizes(metadata, index)
    if sizes is None:
        return 1
    return math.prod(sizes) * dtype_of(metadata, index.fqn).itemsize


def piece_bytes(metadata: Any, item: ReadItem) -> int:
    if item.type == LoadItemType.BYTE_IO:
        return 0
    return math.prod(item.lengths) * dtype_of(metadata, item.storage_index.fqn).itemsize


# ---------------------------------------------------------------- plan
@attrs.define
class _Share:
    uid: int
    index: MetadataIndex
    size: int
    is_bytes: bool
    consumers: dict[int, list[ReadItem]]
    owner: int = -1


def _key(index: MetadataIndex) -> tuple[str, tuple[int, ...]]:
    return (index.fqn, tuple(index.offset or ()))


def _group(all_plans: Sequence[LoadPlan], hosts: list[str], scope: str) -> dict[tuple[Any, ...], _Share]:
    """Read items by (stored chunk, sharing scope): one share each, consumers in rank order."""
    shares: dict[tuple[Any, ...], _Share] = {}
    for rank, plan in enumerate(all_plans):
        for item in plan.items:
            key = (_key(item.storage_index), hosts[rank] if scope == "node" else "")
            share = shares.get(key)
            if share is None:
                share = shares[key] = _Share(-1, item.storage_index, 0, item.type == LoadItemType.BYTE_IO, {})
            share.consumers.setdefault(rank, []).append(item)
    for uid, key in enumerate(sorted(shares, key=lambda k: (k[0][0], k[0][1], k[1]))):
        shares[key].uid = uid
    return shares


def _proxy(share: _Share, metadata: Any) -> ReadItem:
    first = next(iter(share.consumers.values()))[0]
    dest = MetadataIndex(f"{PROXY_PREFIX}{share.uid}")
    if share.is_bytes:
        return dataclasses.replace(first, dest_index=dest)
    sizes = _chunk_sizes(metadata, share.index)
    if sizes is None:  # pragma: no cover - metadata always lists the chunk it stores
        raise ValueError(f"no stored chunk {share.index} in the checkpoint metadata")
    zeros = torch.Size([0] * len(sizes))
    return dataclasses.replace(
        first, dest_index=dest, dest_offsets=zeros, storage_offsets=zeros, lengths=torch.Size(sizes)
    )


def _assign_owners(shared: list[_Share], load: list[int]) -> None:
    for share in sorted(shared, key=lambda s: (-s.size, s.uid)):
        owner = min(share.consumers, key=lambda r: (load[r], r))
        share.owner = owner
        load[owner] += share.size


def _cost(share: _Share, world: int, metadata: Any) -> list[int]:
    """Bytes each rank holds for a share during its round: staged + sent (owner), received (others)."""
    cost = [0] * world
    cost[share.owner] += share.size
    for rank, items in share.consumers.items():
        for item in items:
            nbytes = aligned(piece_bytes(metadata, item))
            if rank != share.owner:
                cost[share.owner] += nbytes
                cost[rank] += nbytes
    return cost


def _rounds(shared: list[_Share], world: int, limit: int, metadata: Any) -> list[list[_Share]]:
    """Pack tensor shares into rounds (largest first).

    Two rounds are in flight at a time (the next one is read while this one is
    exchanged), so a round may hold ``limit / 2`` bytes per rank; rounds are also kept
    to about an eighth of the busiest rank's total, so that reads and exchange overlap.
    """
    costs = {s.uid: _cost(s, world, metadata) for s in shared}
    busiest = max((sum(c[r] for c in costs.values()) for r in range(world)), default=0)
    per_round = max(1, min(limit // 2, max(busiest // 8, 4 << 20)))
    rounds: list[list[_Share]] = []
    current: list[_Share] = []
    used = [0] * world
    for share in sorted(shared, key=lambda s: (-s.size, s.uid)):
        cost = costs[share.uid]
        if current and any(u + c > per_round for u, c in zip(used, cost)):
            rounds.append(current)
            current, used = [], [0] * world
        current.append(share)
        used = [u + c for u, c in zip(used, cost)]
    if current:
        rounds.append(current)
    return rounds


def _rank_round(rank: int, world: int, shares: list[_Share], metadata: Any, is_bytes: bool) -> RankRound:
    reads = []
    send: list[list[Piece]] = [[] for _ in range(world)]
    recv: list[list[Piece]] = [[] for _ in range(world)]
    local = []
    for share in shares:
        if share.owner == rank:
            reads.append(_proxy(share, metadata))
        for consumer, items in share.consumers.items():
            for item in items:
                piece = Piece(share.uid, item, piece_bytes(metadata, item))
                if consumer == share.owner == rank:
                    local.append(piece)
                elif share.owner == rank:
                    send[consumer].append(piece)
                elif consumer == rank:
                    recv[share.owner].append(piece)
    return RankRound(tuple(reads), tuple(map(tuple, send)), tuple(map(tuple, recv)), tuple(local), is_bytes)


def _plain(all_plans: Sequence[LoadPlan], reason: str, collect: bool, read: list[int], totals: tuple[int, int]) -> list[LoadPlan]:
    world = len(all_plans)
    return [
        LoadPlan(list(p.items), planner_data={SCHEDULE_KEY: RankSchedule(
            "plain", reason, r, world, collect, read_bytes=read[r], stored_bytes=totals[0], default_read_bytes=totals[1]
        )})
        for r, p in enumerate(all_plans)
    ]


def _check_infos(all_plans: Sequence[LoadPlan], infos: list[Any]) -> str:
    """Why cooperation is impossible ('' when it is possible)."""
    world = len(all_plans)
    if world < 2:
        return "a single rank has nobody to share with"
    for rank, plan in enumerate(all_plans):
        if not reader_marked(plan):
            return (f"rank {rank}'s storage reader does not call planner.finish_reads "
                    "(use dcplan.FileSystemReader)")
    for rank, info in enumerate(infos):
        if not isinstance(info, dict):
            return f"rank {rank} sent no cooperative-load info"
        if (info.get("rank"), info.get("world")) != (rank, world):
            return (f"rank {rank} is rank {info.get('rank')} of {info.get('world')} in the planner's process "
                    f"group, not {rank} of {world}: set planner.process_group to the group given to dcp.load")
    return ""


def plan_cooperative(
    all_plans: Sequence[LoadPlan],
    metadata: Any,
    *,
    scope: str = "world",
    max_in_flight: int = 256 << 20,
    min_saving: float = 0.1,
) -> list[LoadPlan]:
    """The cooperative global plan: one plan per rank, schedule in ``planner_data``.

    :param all_plans: the ranks' local plans (``planner_data`` with the load infos).
    :param metadata: the checkpoint metadata (chunk sizes, dtypes, stored lengths).
    :param scope: ``"world"`` shares across all ranks, ``"node"`` only among ranks of a host.
    :param max_in_flight: bytes of staged plus exchanged data a rank holds per round.
    :param min_saving: below this fraction of the default load's bytes saved, read plainly.
    """
    world = len(all_plans)
    infos = load_infos(all_plans)
    hosts = [str(i.get("host", "")) if isinstance(i, dict) else "" for i in infos]
    shares = _group(all_plans, hosts, scope)
    read = [0] * world
    default_total = 0
    distinct: dict[tuple[str, tuple[int, ...]], int] = {}
    for share in shares.values():
        share.size = stored_size(metadata, share.index)
        distinct[_key(share.index)] = share.size
        for rank, items in share.consumers.items():
            read[rank] += share.size * len(items)
            default_total += share.size * len(items)
    totals = (sum(distinct.values()), default_total)
    why = _check_infos(all_plans, infos)
    if why:
        return _plain(all_plans, why, collect=world > 1 and all(reader_marked(p) for p in all_plans)
                      and "process group" not in why, read=read, totals=totals)
    shared = [s for s in shares.values() if len(s.consumers) > 1]
    saved = sum(s.size * (sum(len(v) for v in s.consumers.values()) - 1) for s in shared)
    if default_total == 0 or saved < min_saving * default_total:
        pct = 100.0 * saved / default_total if default_total else 0.0
        return _plain(all_plans, f"only {pct:.1f}% of the default load's bytes are read by several ranks "
                      f"(min_saving = {min_saving:g}): plain reads", True, read, totals)
    load = [0] * world
    for share in shares.values():
        if len(share.consumers) == 1:
            (rank, items), = share.consumers.items()
            load[rank] += share.size * len(items)
    private = list(load)
    _assign_owners(shared, load)
    round_shares = [[s for s in shared if s.is_bytes]] if any(s.is_bytes for s in shared) else []
    round_shares += _rounds([s for s in shared if not s.is_bytes], world, max_in_flight, metadata)
    device = "cuda" if all(i.get("cuda") and i.get("nccl") for i in infos) else "cpu"
    summary = (f"{len(shared)} shared stored chunks, {len(round_shares)} round(s), "
               f"{100.0 * saved / default_total:.1f}% of the default load's bytes not read")
    out = []
    for rank, plan in enumerate(all_plans):
        rounds = tuple(_rank_round(rank, world, rs, metadata, bool(rs and rs[0].is_bytes)) for rs in round_shares)
        mine = [it for it in plan.items if len(shares[(_key(it.storage_index), hosts[rank] if scope == "node" else "")].consumers) == 1]
        sched = RankSchedule("coop", summary, rank, world, True, device, rounds, load[rank], totals[0], totals[1])
        assert load[rank] >= private[rank]
        out.append(LoadPlan(mine, planner_data={SCHEDULE_KEY: sched}))
    return out
