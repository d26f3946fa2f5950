"""Slow, metered storage for tests, benchmarks and the demo.

:class:`MeteredFileSystemReader` is :class:`dcplan.FileSystemReader` over a file
system whose data-file streams count every byte the reader pulls from them (below the
reader: what ``read``/``readinto`` return, ``.metadata`` excluded) and, when given a
bandwidth, throttle this reader (one per rank) to it. It stands in for per-node
storage limits::

    reader = MeteredFileSystemReader(path, bandwidth=200 << 20)   # 200 MiB/s for this rank
    dcp.load(sd, storage_reader=reader, planner=dcplan.LoadPlanner())
    reader.meter.bytes_read, reader.meter.seconds
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from typing import Any

from dcplan.storage.reader import FileSystemReader

__all__ = ["Meter", "MeteredFileSystemReader"]


class Meter:
    """Bytes read from data files and the time spent in reads, with an optional throttle."""

    def __init__(self, bandwidth: float | None = None) -> None:
        self.bandwidth = bandwidth
        self.bytes_read = 0
        self.reads = 0
        self.seconds = 0.0
        self._ready = 0.0  # when the throttled "device" is free again

    def account(self, n: int, t0: float) -> None:
        self.bytes_read += n
        self.reads += 1
        if self.bandwidth:
            start = max(t0, self._ready)
            self._ready = start + n / self.bandwidth
            delay = self._ready - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        self.seconds += time.perf_counter() - t0


class _MeteredStream:
    def __init__(self, stream: Any, meter: Meter) -> None:
        self._s = stream
        self._meter = meter

    def read(self, size: int = -1) -> bytes:
        t0 = time.perf_counter()
        data = self._s.read(size)
        self._meter.account(len(data), t0)
        return data  # type: ignore[no-any-return]

    def readinto(self, b: Any) -> int:
        t0 = time.perf_counter()
        n = self._s.readinto(b)
        self._meter.account(n or 0, t0)
        return n  # type: ignore[no-any-return]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._s, name)


class _MeteredFS:
    def __init__(self, fs: Any, meter: Meter) -> None:
        self._fs = fs
        self._meter = meter

    @contextlib.contextmanager
    def create_stream(self, path: Any, mode: str) -> Iterator[Any]:
        with self._fs.create_stream(path, mode) as stream:
            if "r" in mode and not os.fspath(path).endswith(".metadata"):
                yield _MeteredStream(stream, self._meter)
            else:
                yield stream

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fs, name)


class MeteredFileSystemReader(FileSystemReader):
    """``dcplan.FileSystemReader`` that meters (and optionally throttles) data-file reads.

    :param path: the checkpoint directory.
    :param bandwidth: bytes per second this reader may read (``None``: unthrottled).
    :ivar meter: a :class:`Meter`: ``bytes_read``, ``reads``, ``seconds``.
    """

    def __init__(self, path: str | os.PathLike[str], *args: Any, bandwidth: float | None = None, **kwargs: Any) -> None:
        super().__init__(path, *args, **kwargs)
        self.meter = Meter(bandwidth)
        self.fs = _MeteredFS(self.fs, self.meter)  # type: ignore[assignment,has-type]

    def _open_data(self, path: str) -> Any:
        # dcplan's reader opens data files here (torch's reads through self.fs.create_stream)
        return _MeteredStream(super()._open_data(path), self.meter)
