"""A pool of real gloo processes that stays up across many tests.

Starting a process that imports torch costs seconds on a small machine, so a
test module starts one :class:`GlooPool` and runs many functions on it::

    pool = GlooPool(world_size=4)
    results = pool.run(fn, *args)   # fn(rank, world_size, *args) on every rank
    pool.close()

``fn`` must be importable (module-level). Exceptions on any rank are re-raised
in the caller with the rank's traceback. A rank that dies or hangs fails the
call (timeout) and the pool is restarted on the next call.
"""

from __future__ import annotations

import os
import socket
import traceback
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp

__all__ = ["GlooPool", "RankError", "free_port"]


class RankError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, world_size: int, port: int, inbox: Any, outbox: Any, env: dict[str, str]) -> None:
    os.environ.update(env)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    os.environ["RANK"] = str(rank)
    os.environ["WORLD_SIZE"] = str(world_size)
    os.environ["LOCAL_RANK"] = str(rank)
    os.environ["LOCAL_WORLD_SIZE"] = str(world_size)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    while True:
        task = inbox.get()
        if task is None:
            break
        fn, args, kwargs = task
        try:
            result = ("ok", fn(rank, world_size, *args, **kwargs))
        except BaseException as exc:  # noqa: BLE001
            result = ("err", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        outbox.put((rank, result))
    # Every result has been received by the parent. Tearing down gloo and torch at
    # interpreter exit costs seconds per process and buys nothing here.
    outbox.close()
    outbox.join_thread()
    os._exit(0)


class GlooPool:
    """``world_size`` processes in one gloo process group, reused across calls."""

    def __init__(self, world_size: int, env: dict[str, str] | None = None, timeout: float = 300.0) -> None:
        self.world_size = world_size
        self.env = dict(env or {})
        self.timeout = timeout
        self._ctx = mp.get_context("spawn")
        self._procs: list[Any] = []
        self._start()

    def _start(self) -> None:
        port = free_port()
        self._inboxes = [self._ctx.Queue() for _ in range(self.world_size)]
        self._outbox = self._ctx.Queue()
        self._procs = [
            self._ctx.Process(
                target=_worker,
                args=(r, self.world_size, port, self._inboxes[r], self._outbox, self.env),
                daemon=True,
            )
            for r in range(self.world_size)
        ]
        for p in self._procs:
            p.start()

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list[Any]:
        """Run ``fn(rank, world_size, *args, **kwargs)`` on every rank; results by rank."""
        if any(not p.is_alive() for p in self._procs):
            self.close()
            self._start()
        for q in self._inboxes:
            q.put((fn, args, kwargs))
        results: dict[int, Any] = {}
        errors: dict[int, str] = {}
        import queue

        for _ in range(self.world_size):
            try:
                rank, (status, value) = self._outbox.get(timeout=self.timeout)
            except queue.Empty:
                self.close()
                raise RankError(f"ranks {sorted(set(range(self.world_size)) - set(results) - set(errors))} "
                                f"did not answer within {self.timeout}s") from None
            if status == "ok":
                results[rank] = value
            else:
                errors[rank] = value
        if errors:
            detail = "\n".join(f"--- rank {r} ---\n{e}" for r, e in sorted(errors.items()))
            raise RankError(f"{len(errors)} rank(s) failed:\n{detail}")
        return [results[r] for r in range(self.world_size)]

    def run_expect_errors(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list[tuple[str, Any]]:
        """Like :meth:`run` but returns ``(status, value)`` per rank instead of raising."""
        for q in self._inboxes:
            q.put((fn, args, kwargs))
        out: dict[int, Any] = {}
        for _ in range(self.world_size):
            rank, res = self._outbox.get(timeout=self.timeout)
            out[rank] = res
        return [out[r] for r in range(self.world_size)]

    def close(self) -> None:
        for q in getattr(self, "_inboxes", []):
            try:
                q.put(None)
            except Exception:  # noqa: BLE001
                pass
        import time

        deadline = time.monotonic() + 10
        for p in self._procs:
            p.join(timeout=max(0.1, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        self._procs = []

    def __enter__(self) -> GlooPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
