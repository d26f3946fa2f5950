"""The exchange (every rank): after its own reads, a rank reads the shares it owns round
by round and swaps them with ``all_to_all_single`` over the process group.

Received data goes into the destination tensors the way torch's reader does it:
``planner.resolve_tensor(item)`` → ``copy_`` → ``planner.commit_tensor(item, tensor)``
(non-tensor items through ``planner.load_bytes``), so resharding, partial loads,
dtype casts and the safe unpickler behave exactly as in a plain load.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem

from dcplan import compat
from dcplan_coop_load.plan import PROXY_PREFIX, Piece, RankRound, RankSchedule, aligned, dtype_of
from dcplan_coop_load.report import CoopLoadStats, log_stats

__all__ = ["CoopSession"]


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


class CoopSession:
    """One rank's part of one cooperative load (created by ``finish_plan``)."""

    def __init__(self, planner: Any, schedule: RankSchedule, group: Any) -> None:
        self.planner = planner
        self.schedule = schedule
        self.group = group
        self.t0 = time.perf_counter()
        self.staged: dict[int, Any] = {}
        self.sent = 0
        self.received = 0
        self.error: BaseException | None = None
        if schedule.device == "cuda":
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.device = torch.device("cpu")

    # -- the planner's data path, for the proxy reads this rank does for a share
    @staticmethod
    def _uid(read_item: ReadItem) -> int | None:
        fqn = read_item.dest_index.fqn
        return int(fqn[len(PROXY_PREFIX):]) if fqn.startswith(PROXY_PREFIX) else None

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor | None:
        uid = self._uid(read_item)
        if uid is None:
            return None
        dtype = dtype_of(self.planner.metadata, read_item.storage_index.fqn)
        buf = torch.empty(tuple(read_item.lengths), dtype=dtype, device=self.device)
        self.staged[uid] = buf
        return buf

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> bool:
        return self._uid(read_item) is not None

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> bool:
        uid = self._uid(read_item)
        if uid is None:
            return False
        self.staged[uid] = value.read()
        return True

    # -- after the rank's own reads
    def finish_reads(self, plan: LoadPlan, read: Callable[[LoadPlan], None] | None, error: BaseException | None) -> None:
        sched = self.schedule
        if not sched.collect:
            return
        failed = self._any(error is not None or (sched.mode == "coop" and read is None))
        if failed:  # a rank failed reading: nobody exchanges; dcp reports that rank's error everywhere
            if error is None and read is None and sched.mode == "coop":
                raise RuntimeError("dcplan cooperative load: the storage reader gave finish_reads no read callback")
            return
        if sched.mode == "coop":
            assert read is not None
            self._run_rounds(sched.rounds, read)
        stats = self._gather_stats()
        self.planner.load_stats = stats
        if getattr(self.planner, "is_coordinator", False) and self.planner.config.report:
            log_stats(stats)
        if self.error is not None:
            raise self.error

    def _any(self, flag: bool) -> bool:
        t = torch.tensor([1 if flag else 0], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return bool(t.item())

    def _deliver(self, item: ReadItem, piece: Any) -> None:
        planner = self.planner
        try:
            if isinstance(piece, (bytes, bytearray)):
                planner.load_bytes(item, io.BytesIO(bytes(piece)))
                return
            target = planner.resolve_tensor(item).detach()
            if target.size() != piece.size():
                raise AssertionError(f"req {item.storage_index} mismatch sizes {target.size()} vs {piece.size()}")
            target.copy_(piece)
            planner.commit_tensor(item, target)
        except Exception as exc:  # noqa: BLE001 - keep exchanging (peers wait), raise at the end
            if self.error is None:
                self.error = exc

    def _region(self, p: Piece) -> Any:
        staged = self.staged.get(p.uid)
        if isinstance(staged, (bytes, bytearray)):
            return staged
        if staged is None:  # the read failed (error recorded); send filler of the right size
            return b"" if p.item.type == LoadItemType.BYTE_IO else torch.zeros(
                p.nbytes, dtype=torch.uint8, device=self.device)
        return compat.narrow_tensor_by_index(staged, p.item.storage_offsets, p.item.lengths)

    def _read_round(self, rnd: RankRound, read: Callable[[LoadPlan], None]) -> None:
        if not rnd.reads:
            return
        try:
            read(LoadPlan(list(rnd.reads)))
        except Exception as exc:  # noqa: BLE001 - peers wait for this round: send, then raise
            if self.error is None:
                self.error = exc

    def _run_rounds(self, rounds: tuple[RankRound, ...], read: Callable[[LoadPlan], None]) -> None:
        """Exchange round k while a helper thread reads round k + 1 (two rounds in flight)."""
        if not rounds:
            return
        with ThreadPoolExecutor(1, thread_name_prefix="dcplan-coop-read") as pool:
            pending = pool.submit(self._read_round, rounds[0], read)
            for k, rnd in enumerate(rounds):
                pending.result()
                if k + 1 < len(rounds):
                    pending = pool.submit(self._read_round, rounds[k + 1], read)
                self._round(rnd)

    def _round(self, rnd: RankRound) -> None:
        for p in rnd.local:
            self._deliver(p.item, self._region(p))
        if rnd.bytes_round:
            self._bytes_exchange(rnd)
        else:
            self._tensor_exchange(rnd)
        for item in rnd.reads:
            uid = self._uid(item)
            if uid is not None:
                self.staged.pop(uid, None)

    def _tensor_exchange(self, rnd: RankRound) -> None:
        in_splits = [sum(aligned(p.nbytes) for p in ps) for ps in rnd.send]
        out_splits = [sum(aligned(p.nbytes) for p in ps) for ps in rnd.recv]
        inp = torch.empty(sum(in_splits), dtype=torch.uint8, device=self.device)
        pos = 0
        for ps in rnd.send:
            for p in ps:
                inp[pos:pos + p.nbytes].copy_(_as_bytes(self._region(p)))
                pos += aligned(p.nbytes)
        out = torch.empty(sum(out_splits), dtype=torch.uint8, device=self.device)
        dist.all_to_all_single(out, inp, out_splits, in_splits, group=self.group)
        self.sent += sum(p.nbytes for ps in rnd.send for p in ps)
        del inp
        pos = 0
        for ps in rnd.recv:
            for p in ps:
                dtype = dtype_of(self.planner.metadata, p.item.storage_index.fqn)
                piece = out[pos:pos + p.nbytes].view(dtype).reshape(tuple(p.item.lengths))
                self._deliver(p.item, piece)
                self.received += p.nbytes
                pos += aligned(p.nbytes)

    def _bytes_exchange(self, rnd: RankRound) -> None:
        payloads = [[bytes(self._region(p)) for p in ps] for ps in rnd.send]
        lens_in = torch.tensor([len(b) for bs in payloads for b in bs], dtype=torch.int64, device=self.device)
        lens_out = torch.empty(sum(len(ps) for ps in rnd.recv), dtype=torch.int64, device=self.device)
        dist.all_to_all_single(lens_out, lens_in, [len(ps) for ps in rnd.recv], [len(ps) for ps in rnd.send],
                               group=self.group)
        recv_lens = lens_out.tolist()
        flat = b"".join(b for bs in payloads for b in bs)
        inp = torch.frombuffer(bytearray(flat), dtype=torch.uint8) if flat else torch.empty(0, dtype=torch.uint8)
        inp = inp.to(self.device)
        out = torch.empty(sum(recv_lens), dtype=torch.uint8, device=self.device)
        in_splits = [sum(len(b) for b in bs) for bs in payloads]
        out_splits, i = [], 0
        for ps in rnd.recv:
            out_splits.append(sum(recv_lens[i:i + len(ps)]))
            i += len(ps)
        dist.all_to_all_single(out, inp, out_splits, in_splits, group=self.group)
        self.sent += len(flat)
        data = out.cpu().numpy().tobytes()
        pos, i = 0, 0
        for ps in rnd.recv:
            for p in ps:
                n = recv_lens[i]
                self._deliver(p.item, data[pos:pos + n])
                self.received += n
                pos += n
                i += 1

    def _gather_stats(self) -> CoopLoadStats:
        sched = self.schedule
        mine = torch.tensor(
            [float(sched.read_bytes), float(self.received), float(self.sent), time.perf_counter() - self.t0],
            dtype=torch.float64, device=self.device,
        )
        rows = [torch.empty_like(mine) for _ in range(sched.world)]
        dist.all_gather(rows, mine, group=self.group)
        table = [tuple(r.tolist()) for r in rows]
        return CoopLoadStats(
            mode=sched.mode,
            reason=sched.reason,
            read_bytes=tuple(int(r[0]) for r in table),
            received_bytes=tuple(int(r[1]) for r in table),
            sent_bytes=tuple(int(r[2]) for r in table),
            seconds=tuple(r[3] for r in table),
            stored_bytes=sched.stored_bytes,
            default_read_bytes=sched.default_read_bytes,
        )
