"""The cooperative load report: per rank, bytes read, received, sent, and time."""

from __future__ import annotations

import logging
from typing import Any

import attrs

from dcplan.fmt import fmt_bytes

__all__ = ["CoopLoadStats", "log_stats"]

log = logging.getLogger("dcplan")


@attrs.frozen
class CoopLoadStats:
    """What one cooperative load did, per rank (index = rank of the process group).

    :ivar mode: ``"coop"`` (shared reads) or ``"plain"`` (fell back to plain reads).
    :ivar reason: why it fell back, or a summary of the sharing.
    :ivar read_bytes: bytes each rank read from storage (planned from the checkpoint's
        stored lengths; the reader reads each planned item once).
    :ivar received_bytes: bytes each rank received from peers.
    :ivar sent_bytes: bytes each rank sent to peers.
    :ivar seconds: each rank's time from ``finish_plan`` to the end of the exchange.
    :ivar stored_bytes: distinct stored bytes the load touches.
    :ivar default_read_bytes: what the default load would read, all ranks together.
    """

    mode: str
    reason: str
    read_bytes: tuple[int, ...]
    received_bytes: tuple[int, ...]
    sent_bytes: tuple[int, ...]
    seconds: tuple[float, ...]
    stored_bytes: int = 0
    default_read_bytes: int = 0

    @property
    def fell_back(self) -> bool:
        return self.mode != "coop"

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)

    def format(self) -> str:
        total = sum(self.read_bytes)
        head = "cooperative" if self.mode == "coop" else "cooperative load fell back to plain reads"
        lines = [
            f"dcplan load ({head}; {len(self.read_bytes)} ranks): {self.reason}",
            f"  read from storage {fmt_bytes(total)} (default load: {fmt_bytes(self.default_read_bytes)}, "
            f"stored: {fmt_bytes(self.stored_bytes)}), slowest rank {max(self.seconds, default=0.0):.3f} s",
            f"  {'rank':>4} {'read':>12} {'received':>12} {'sent':>12} {'time s':>8}",
        ]
        for r, (rd, rc, sn, s) in enumerate(zip(self.read_bytes, self.received_bytes, self.sent_bytes, self.seconds)):
            lines.append(f"  {r:>4} {fmt_bytes(rd):>12} {fmt_bytes(rc):>12} {fmt_bytes(sn):>12} {s:>8.3f}")
        return "\n".join(lines)


def log_stats(stats: CoopLoadStats) -> None:
    """Log the report once (the caller runs it on the coordinator only)."""
    log.info("%s", stats.format())
