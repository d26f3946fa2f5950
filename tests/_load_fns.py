"""Rank functions for the load-side tests (partial load, empty load); run on a GlooPool."""

from __future__ import annotations

import hashlib
import io
import os
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn

import dcplan
from dcplan import compat


def bits(t: torch.Tensor) -> str:
    """A digest of a tensor's dtype, shape and exact bytes."""
    t = t.detach().contiguous().cpu()
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def digest(obj: Any) -> Any:
    """A comparable digest of a nested state dict (tensors by exact bytes, DTensors by full tensor)."""
    if isinstance(obj, compat.DTensor):
        return ("dtensor", bits(obj.full_tensor()))
    if isinstance(obj, torch.Tensor):
        return ("tensor", bits(obj))
    if isinstance(obj, dict):
        return {str(k): digest(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [digest(v) for v in obj]
    if hasattr(obj, "dtype") and hasattr(obj, "tobytes"):  # numpy
        return ("numpy", str(obj.dtype), obj.tobytes())
    return obj


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))


def train_state(rank: int, world: int, seed: int = 0) -> dict[str, Any]:
    """A model + Adam state after one step, a DTensor sharded on dim 0, non-tensor objects."""
    from torch.distributed.device_mesh import init_device_mesh

    model = _model(seed)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.ones(2, 4)).sum().backward()
    opt.step()
    mesh = init_device_mesh("cpu", (world,))
    _, Shard = compat.dtensor_placements()
    torch.manual_seed(seed + 1)
    full = torch.randn(world * 3 + 1, 5)  # uneven shards
    return {
        "model": model.state_dict(),
        "optim": opt.state_dict(),
        "emb": compat.distribute_tensor(full, mesh, [Shard(0)]),
        "meta": {"epoch": 7, "name": "run-a", "lrs": [0.1, 0.01], "flags": (True, None)},
    }


def save_train_state(rank: int, world: int, path: str, writer: str = "torch") -> dict[str, Any]:
    """Save :func:`train_state` with torch's DefaultSavePlanner or dcplan's; return its digest."""
    sd = train_state(rank, world)
    planner = compat.torch_default_save_planner() if writer == "torch" else dcplan.SavePlanner()
    dcp.save(sd, storage_writer=dcp.FileSystemWriter(path), planner=planner)
    return digest(sd)


def _fresh_target(rank: int, world: int) -> dict[str, Any]:
    """A target like :func:`train_state` with zeroed tensors and an Adam state of the right shape."""
    sd = train_state(rank, world, seed=123)
    for v in sd["model"].values():
        v.zero_()
    return sd


def strict_missing(rank: int, world: int, path: str) -> str:
    """Strict load with keys the checkpoint lacks (rank-dependent): return the error text."""
    sd = _fresh_target(rank, world)
    sd["model"]["extra.weight"] = torch.zeros(2)
    sd["optim"]["state"][0]["extra_buf"] = torch.zeros(3)
    sd[f"only_on_rank{rank}"] = torch.zeros(1)
    before = digest(sd)
    try:
        dcp.load(sd, storage_reader=dcplan.FileSystemReader(path), planner=dcplan.LoadPlanner())
    except BaseException as exc:  # noqa: BLE001 - CheckpointException is a BaseException
        assert digest(sd) == before, "tensors were touched before the error"
        return str(exc)
    return ""


def partial_load(rank: int, world: int, path: str, drop: bool = True) -> dict[str, Any]:
    """Partial load: extra keys (missing from the checkpoint) and dropped keys (unexpected)."""
    sd = _fresh_target(rank, world)
    sd["model"]["head.weight"] = torch.full((2, 2), 5.0)
    sd["optim"]["state"][0]["extra_buf"] = torch.full((3,), 5.0)
    if drop:
        del sd["model"]["2.bias"]
        if rank == 0:
            del sd["meta"]["name"]
    planner = dcplan.LoadPlanner(partial_load=True)
    dcp.load(sd, storage_reader=dcplan.FileSystemReader(path), planner=planner)
    ref = train_state(rank, world)
    return {
        "report": planner.report.to_dict(),
        "coordinator": planner.is_coordinator,
        "model_ok": all(bits(sd["model"][k]) == bits(v) for k, v in ref["model"].items() if k in sd["model"]),
        "untouched": bits(sd["model"]["head.weight"]) == bits(torch.full((2, 2), 5.0))
        and bits(sd["optim"]["state"][0]["extra_buf"]) == bits(torch.full((3,), 5.0)),
        "emb_ok": bits(sd["emb"].full_tensor()) == bits(ref["emb"].full_tensor()),
        "optim_ok": digest(sd["optim"]["state"][1]) == digest(ref["optim"]["state"][1]),
        "meta": sd["meta"],
    }


def mismatch_load(rank: int, world: int, path: str, skip: list[str] | None) -> dict[str, Any]:
    """A shape mismatch on model.0.weight and a dtype difference on model.0.bias."""
    sd = _fresh_target(rank, world)
    sd["model"]["0.weight"] = torch.full((6, 5), 9.0)
    sd["model"]["0.bias"] = torch.zeros(6, dtype=torch.float64)
    kwargs: dict[str, Any] = {"partial_load": True}
    if skip is not None:
        kwargs["skip_mismatch_keys"] = skip
    planner = dcplan.LoadPlanner(**kwargs)
    try:
        dcp.load(sd, storage_reader=dcplan.FileSystemReader(path), planner=planner)
    except BaseException as exc:  # noqa: BLE001 - CheckpointException is a BaseException
        return {"error": str(exc), "untouched": bool((sd["model"]["0.weight"] == 9.0).all())}
    ref = train_state(rank, world)
    return {
        "error": None,
        "report": planner.report.to_dict(),
        "untouched": bool((sd["model"]["0.weight"] == 9.0).all()),
        "bias_cast": torch.equal(sd["model"]["0.bias"], ref["model"]["0.bias"].double()),
        "bias_dtype": str(sd["model"]["0.bias"].dtype),
    }


def empty_load_on_one_rank(rank: int, world: int, path: str, keys: list[str] | None = None) -> Any:
    """Only the last rank loads, with the empty loader and no collectives; others return None."""
    if rank != world - 1:
        return None
    from dcplan_empty_load import load_checkpoint

    return digest(load_checkpoint(path, keys=keys))


def empty_load_via_dcp(rank: int, world: int, path: str) -> Any:
    """Every rank loads with ``dcp.load`` and an EmptyLoadPlanner (collective)."""
    from dcplan_empty_load import EmptyLoadPlanner

    planner = EmptyLoadPlanner()
    dcp.load({}, storage_reader=dcplan.FileSystemReader(path), planner=planner)
    return digest(planner.result)


def full_reference(rank: int, world: int) -> Any:
    """The digest of :func:`train_state` with DTensors replaced by their full tensors."""
    sd = train_state(rank, world)
    sd["emb"] = sd["emb"].full_tensor()
    return digest(sd)


def torch_save_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def files(path: str) -> list[str]:
    return sorted(os.listdir(path))


class Box:
    """A user type that the safe loaders block until it is trusted."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Box) and other.value == self.value

    def __hash__(self) -> int:
        return hash(self.value)
