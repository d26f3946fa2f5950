"""Cross-version checkpoint checks (used by ``tools/xver.py`` and ``tests/test_cross_version.py``).

:func:`write_checkpoint` saves :func:`reference_state` with ``dcplan.SavePlanner``
and ``dcplan.FileSystemWriter`` (checksums on) on real gloo ranks; :func:`read_checkpoint`
runs ``dcplan verify`` on it (every checksum must match), then loads it back with
``dcplan.LoadPlanner`` and ``dcplan.FileSystemReader`` in one process and compares bit for bit. The writer records
its torch's features in ``xver.json``, so a reader derives what it should expect from
feature flags, not from version strings.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

__all__ = [
    "MANIFEST",
    "WORLD_SIZE",
    "compare",
    "empty_like_state",
    "read_checkpoint",
    "reference_state",
    "write_checkpoint",
    "write_rank",
]

WORLD_SIZE = 2
MANIFEST = "xver.json"


def reference_state(rank: int, world_size: int, *, sharded: Any = None) -> dict[str, Any]:
    """A state dict that exercises what changed across torch versions.

    Nested dicts and lists (key flattening changed in 2.4), int-keyed optimizer
    state, several dtypes, a non-contiguous tensor, non-tensor objects, replicated
    tensors (deduplicated on save), per-rank keys and a tensor sharded over the
    ranks (``sharded``: a DTensor on the writer; a plain tensor on a reader).
    Values are computed, not random, so every torch version builds identical data.

    :param sharded: the ``"sharded"`` entry; ``None`` means the full plain tensor
        and every rank's per-rank key (what a one-process reader loads).
    """
    import torch

    w = torch.arange(64 * 32, dtype=torch.float32).reshape(64, 32) / 7
    sd: dict[str, Any] = {
        "model": {
            "w": w,
            "b": torch.arange(32, dtype=torch.bfloat16),
            "emb": torch.arange(16 * 8, dtype=torch.int64).reshape(16, 8),
            "mask": torch.arange(10) % 3 == 0,
            "t": w.t(),
        },
        "optim": {
            "state": {0: {"step": torch.tensor(5.0), "exp_avg": w * 0.5}},
            "param_groups": [{"lr": 0.1, "betas": (0.9, 0.999), "params": [0]}],
        },
        "lists": [torch.ones(3), {"x": torch.full((2,), 4.0, dtype=torch.float16)}],
        "extra": {"epoch": 3, "name": "xver", "losses": [0.5, 0.25]},
    }
    for r in range(world_size):
        if sharded is None or r == rank:
            sd[f"rank{r}"] = torch.full((4,), float(r + 1))
    sd["sharded"] = sharded if sharded is not None else torch.arange(16 * 6, dtype=torch.float32).reshape(16, 6)
    return sd


def empty_like_state(sd: dict[str, Any]) -> dict[str, Any]:
    """The same structure with zeroed tensors and ``None`` objects (what a reader passes in)."""
    import torch

    def blank(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return torch.zeros_like(v)
        if isinstance(v, dict):
            return {k: blank(x) for k, x in v.items()}
        if isinstance(v, list):
            if any(isinstance(x, torch.Tensor | dict) for x in v):
                return [blank(x) for x in v]
            return None  # a list of plain values is one object
        return None

    return blank(sd)


def compare(expected: Any, got: Any, path: str = "") -> list[str]:
    """Differences between two state dicts (tensors bit-exact, with dtype and shape)."""
    import torch

    if isinstance(expected, torch.Tensor):
        if not isinstance(got, torch.Tensor):
            return [f"{path}: expected a tensor, got {type(got).__name__}"]
        if expected.dtype != got.dtype or expected.shape != got.shape:
            return [f"{path}: expected {expected.dtype}{list(expected.shape)}, got {got.dtype}{list(got.shape)}"]
        return [] if torch.equal(expected, got) else [f"{path}: values differ"]
    if isinstance(expected, dict):
        if not isinstance(got, dict) or set(expected) != set(got):
            return [f"{path}: keys differ: {sorted(map(str, expected))} vs {sorted(map(str, got or {}))}"]
        return [d for k in expected for d in compare(expected[k], got[k], f"{path}.{k}" if path else str(k))]
    if isinstance(expected, list | tuple):
        if not isinstance(got, list | tuple) or len(expected) != len(got):
            return [f"{path}: expected {expected!r}, got {got!r}"]
        return [d for i, (e, g) in enumerate(zip(expected, got)) for d in compare(e, g, f"{path}[{i}]")]
    return [] if expected == got else [f"{path}: expected {expected!r}, got {got!r}"]


def write_rank(rank: int, world_size: int, path: str) -> str:
    """On every rank of a :class:`~dcplan.testing.procs.GlooPool`: save the reference state."""
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh

    import dcplan
    from dcplan import compat

    _, Shard = compat.dtensor_placements()
    mesh = init_device_mesh("cpu", (world_size,))
    full = reference_state(0, world_size)["sharded"]
    sd = reference_state(rank, world_size, sharded=compat.distribute_tensor(full, mesh, [Shard(0)]))
    # dcplan's writer: atomic commit and a checksum per item, which every other torch must verify
    dcp.save(sd, storage_writer=dcplan.FileSystemWriter(path), planner=dcplan.SavePlanner(report=False))
    dist.barrier()
    if rank == 0:
        manifest = {"torch": torch.__version__, "has_strides": compat.HAS_STRIDES, "world_size": world_size,
                    "checksums": True}
        (Path(path) / MANIFEST).write_text(json.dumps(manifest))
    return "ok"


def _verify_checksums(path: Path, manifest: dict[str, Any]) -> str:
    """``dcplan verify`` on a checkpoint: ``""`` when fine, else what is wrong.

    A checkpoint whose writer stored checksums (``manifest["checksums"]``) must have them
    verified here, item by item; one from an older dcplan (no checksums) must verify its
    files and sizes. ``.metadata`` this torch cannot read raises, as the load does.
    """
    from dcplan.storage.verify import verify_checkpoint

    report = verify_checkpoint(path, progress=False)
    want = "verified" if manifest.get("checksums") else "absent"
    if report.checksums != want:
        return f"dcplan verify: checksums {report.checksums}, expected {want}"
    if not report.ok:
        return "dcplan verify: " + "; ".join(p.detail for p in report.problems[:5])
    return ""


def write_checkpoint(pool: Any, path: str | Path) -> None:
    """Save the reference state into ``path`` with the ranks of ``pool``."""
    Path(path).mkdir(parents=True, exist_ok=True)
    pool.run(write_rank, str(path))


def read_checkpoint(path: str | Path) -> tuple[str, str]:
    """Load a reference checkpoint in this process and verify it.

    :returns: ``("ok", "")``; ``("refused", message)`` when this torch cannot read the
        writer's format and dcplan said so clearly (the message of
        :class:`~dcplan.load.safe.MetadataVersionError`, naming this torch's version); or
        ``("bad", details)`` for anything else.
    """
    import torch
    import torch.distributed.checkpoint as dcp

    import dcplan
    from dcplan import compat

    path = Path(path)
    manifest = json.loads((path / MANIFEST).read_text())
    expected = reference_state(0, int(manifest["world_size"]))
    sd = empty_like_state(expected)
    unreadable = bool(manifest["has_strides"]) and not compat.HAS_STRIDES
    logged: list[str] = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = lambda record: logged.append(record.getMessage())  # type: ignore[method-assign]
    log = logging.getLogger("dcplan")
    log.addHandler(handler)
    try:
        checked = _verify_checksums(path, manifest)
        if checked:
            return "bad", checked
        # dcplan's reader: safe .metadata, confined paths and, when the writer stored them, checksums
        dcp.load(sd, storage_reader=dcplan.FileSystemReader(str(path)), planner=dcplan.LoadPlanner())
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - torch's CheckpointException is a BaseException
        # torch 2.9-2.11 replace the reader's error with "metadata is None"; dcplan logs it
        text = "\n".join([f"{type(exc).__name__}: {exc}", *logged])
        # torch wraps it (CheckpointException; from 2.9 an AssertionError joining the
        # global and rank-local metadata failures), so look for dcplan's message itself.
        marker = "was written by a newer torch (>= 2.15"
        if unreadable and marker in text and f"torch {torch.__version__} " in text:
            return "refused", next(line.strip() for line in text.splitlines() if marker in line)
        return "bad", text
    finally:
        log.removeHandler(handler)
    if unreadable:
        return "bad", "loaded a checkpoint whose metadata this torch should not be able to read"
    diffs = compare(expected, sd)
    return ("bad", "; ".join(diffs[:10])) if diffs else ("ok", "")
