"""Rank functions for the cooperative-load tests (dcplan-coop-load); run on a GlooPool."""

from __future__ import annotations

import os
import sys
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

import dcplan
from dcplan import compat
from dcplan.testing.storage import MeteredFileSystemReader

sys.path.insert(0, os.path.dirname(__file__))
from _load_fns import digest  # noqa: E402


def _mlp_state(seed: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16), nn.LayerNorm(16))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.randn(4, 32)).pow(2).mean().backward()
    opt.step()
    return {"model": model.state_dict(), "optim": opt.state_dict()}


def _meta(seed: int) -> dict[str, Any]:
    return {"epoch": 3 + seed, "name": f"run-{seed}", "lrs": [0.1, 0.01 * (seed + 1)]}


def state(layout: str, rank: int, world: int, seed: int = 0) -> dict[str, Any]:
    """A state dict in one of the test layouts; the same values on every rank for a seed.

    * ``ddp``: plain tensors (model + Adam state) and objects, every rank holds all;
    * ``hsdp``: DTensors on a (2, world/2) mesh, ``[Replicate(), Shard(0)]``, plus ddp parts;
    * ``tp``: DTensors on a (2, world/2) mesh, ``[Replicate(), Shard(1)]``, and a replicated DTensor;
    * ``fsdp``: DTensors ``Shard(0)`` over all ranks only (almost nothing shared);
    * ``full``: plain full tensors of the DTensor layouts (for resharding loads);
    * ``row``: 1-D ``Shard(1)`` DTensors over all ranks of the same tensors (resharding target).
    """
    from torch.distributed.device_mesh import init_device_mesh

    Replicate, Shard = compat.dtensor_placements()
    g = torch.Generator().manual_seed(1000 + seed)
    big = torch.randn(48, 40, generator=g)
    wide = torch.randn(24, 64, generator=g).to(torch.bfloat16)
    counts = torch.randint(0, 1000, (40,), generator=g, dtype=torch.int64)
    if layout == "ddp":
        return {**_mlp_state(seed), "big": big, "wide": wide, "counts": counts, "meta": _meta(seed)}
    if layout == "full":
        return {"big": big, "wide": wide, "counts": counts, "meta": _meta(seed)}
    if layout == "fsdp":  # model-sized tensors: the few replicated objects are a small part
        big = torch.randn(512, 96, generator=g)
        mesh = init_device_mesh("cpu", (world,))
        return {
            "big": compat.distribute_tensor(big, mesh, [Shard(0)]),
            "wide": compat.distribute_tensor(wide, mesh, [Shard(0)]),
            "counts": compat.distribute_tensor(counts, mesh, [Shard(0)]),
            "meta": _meta(seed),
        }
    if layout == "row":
        mesh = init_device_mesh("cpu", (world,))
        return {
            "big": compat.distribute_tensor(big, mesh, [Shard(1)]),
            "wide": compat.distribute_tensor(wide, mesh, [Shard(1)]),
            "counts": compat.distribute_tensor(counts, mesh, [Replicate()]),
            "meta": _meta(seed),
        }
    mesh2 = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "shard"))
    dim = 0 if layout == "hsdp" else 1
    out = {
        "big": compat.distribute_tensor(big, mesh2, [Replicate(), Shard(dim)]),
        "wide": compat.distribute_tensor(wide, mesh2, [Replicate(), Shard(dim)]),
        "counts": compat.distribute_tensor(counts, mesh2, [Replicate(), Replicate()]),
        "meta": _meta(seed),
    }
    if layout == "hsdp":
        out.update(_mlp_state(seed))
    return out


def save(rank: int, world: int, path: str, layout: str) -> Any:
    """Save a layout with torch's default planner; return the state's digest."""
    sd = state(layout, rank, world, seed=0)
    dcp.save(sd, storage_writer=dcp.FileSystemWriter(path), planner=compat.torch_default_save_planner())
    return digest(sd)


def save_on_two(rank: int, world: int, path: str) -> Any:
    """Ranks 0 and 1 save the ``full`` layout on a two-rank group (the others wait)."""
    group = dist.new_group([0, 1])
    out = None
    if rank < 2:
        sd = state("full", rank, 2, seed=0)
        dcp.save(sd, storage_writer=dcp.FileSystemWriter(path), planner=dcplan.SavePlanner(), process_group=group)
        out = digest(sd)
    dist.barrier()
    return out


def load(
    rank: int,
    world: int,
    path: str,
    layout: str,
    strategy: str,
    options: dict[str, Any] | None = None,
    *,
    drop: tuple[str, ...] = (),
    add: tuple[str, ...] = (),
    partial: bool = False,
    two: bool = False,
    host_of_rank: bool = False,
) -> dict[str, Any]:
    """Load ``path`` into a fresh ``layout`` state; ``strategy`` is ``torch`` or a dcplan load strategy.

    :param drop: top-level keys removed from the target (a partial request).
    :param add: top-level keys added to the target that the checkpoint lacks.
    :param two: load on ranks 0 and 1 only (a two-rank process group).
    """
    group = dist.new_group([0, 1]) if two else None
    if two and rank >= 2:
        dist.barrier()
        return {}
    sd = state(layout, rank, 2 if two else world, seed=100)
    for key in drop:
        sd.pop(key)
    for key in add:
        sd[key] = torch.full((3,), 7.0)
    reader = MeteredFileSystemReader(path)
    if strategy == "torch":
        planner: Any = compat.torch_default_load_planner()
    else:
        options = dict(options or {})
        if host_of_rank:
            options["host"] = f"h{rank // 2}"
        planner = dcplan.LoadPlanner(load_strategy=strategy, load_strategy_options=options, partial_load=partial)
        if group is not None:
            planner.process_group = group
    import logging

    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    log = logging.getLogger("dcplan")
    log.addHandler(handler)
    old_level = log.level
    log.setLevel(logging.INFO)
    try:
        dcp.load(sd, storage_reader=reader, planner=planner, process_group=group)
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)
    stats = getattr(planner, "load_stats", None)
    out = {
        "load_reports_logged": sum(1 for m in records if m.startswith("dcplan load (")),
        "digest": digest(sd),
        "bytes": reader.meter.bytes_read,
        "stats": stats.to_dict() if stats is not None else None,
    }
    if two:
        dist.barrier()
    return out


def strict_missing(rank: int, world: int, path: str) -> str:
    sd = state("ddp", rank, world, seed=100)
    sd[f"only_on_rank{rank}"] = torch.zeros(2)
    try:
        dcp.load(sd, storage_reader=MeteredFileSystemReader(path),
                 planner=dcplan.LoadPlanner(load_strategy="cooperative"))
    except BaseException as exc:  # noqa: BLE001 - torch's CheckpointException is a BaseException
        return f"{type(exc).__name__}: {exc}"
    return ""


def data_bytes(path: str) -> int:
    """Bytes in a checkpoint's data files."""
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".distcp"))


def read_once_bytes(path: str) -> int:
    """What reading every stored record of the checkpoint exactly once costs below dcplan's reader.

    Each record is read the way ``dcplan.FileSystemReader`` reads it during a load (its
    ``_read_file``: a tensor straight from its record, or ``torch.load`` of the record when the
    direct path does not read it), whole, into a fresh tensor, so the count is the same on every
    torch, whatever torch's own reader would read around a record.
    """
    from types import SimpleNamespace

    from torch.distributed.checkpoint.planner import LoadItemType

    class _Sink:
        def resolve_tensor(self, req: Any) -> torch.Tensor:
            return torch.empty(tuple(req.lengths), dtype=md.state_dict_metadata[req.storage_index.fqn].properties.dtype)

        def commit_tensor(self, req: Any, tensor: torch.Tensor) -> None:
            pass

        def load_bytes(self, req: Any, value: Any) -> None:
            pass

    reader = MeteredFileSystemReader(path)
    md = reader.read_metadata()
    reader.set_up_storage_reader(md, True)
    per_file: dict[str, list[Any]] = {}
    for index, info in sorted(md.storage_data.items(), key=lambda kv: (kv[1].relative_path, kv[1].offset)):
        smd = md.state_dict_metadata[index.fqn]
        is_bytes = isinstance(smd, compat.BytesStorageMetadata)
        if is_bytes:
            lengths: list[int] = []
        else:
            chunk = next(c for c in smd.chunks if list(c.offsets) == list(index.offset or c.offsets))
            lengths = list(chunk.sizes)
        per_file.setdefault(info.relative_path, []).append(SimpleNamespace(
            storage_index=index, dest_index=index, storage_offsets=[0] * len(lengths), dest_offsets=[0] * len(lengths),
            lengths=lengths, type=LoadItemType.BYTE_IO if is_bytes else LoadItemType.TENSOR))
    for rel, reqs in per_file.items():
        reader._read_file(path, rel, reqs, _Sink())
    return reader.meter.bytes_read


class FailingReader(MeteredFileSystemReader):
    """Fails reading on one rank (a real read error: the file is gone for this reader)."""

    def __init__(self, path: str, fail: bool) -> None:
        super().__init__(path)
        self.fail = fail

    def _open_data(self, path: str) -> Any:
        if self.fail:
            raise OSError("simulated storage failure on this rank")
        return super()._open_data(path)


def load_failing(rank: int, world: int, path: str) -> str:
    sd = state("ddp", rank, world, seed=100)
    try:
        dcp.load(sd, storage_reader=FailingReader(path, fail=rank == 1),
                 planner=dcplan.LoadPlanner(load_strategy="cooperative"))
    except BaseException as exc:  # noqa: BLE001 - torch's CheckpointException is a BaseException
        return f"{type(exc).__name__}: {exc}"
    return ""


def load_torch_reader(rank: int, world: int, path: str) -> dict[str, Any]:
    """cooperative planner with torch's own FileSystemReader: no finish_reads, so plain reads."""
    sd = state("ddp", rank, world, seed=100)
    planner = dcplan.LoadPlanner(load_strategy="cooperative")
    dcp.load(sd, storage_reader=dcp.FileSystemReader(path), planner=planner)
    return {"digest": digest(sd), "stats": planner.load_stats}
