"""Device check (needs a CUDA GPU): cooperative loads into CUDA tensors.

* gloo, 4 ranks sharing the GPU: a DDP-like state on CUDA is loaded with torch's default
  load and with ``cooperative`` (data moves through the CPU); bit-exact per rank, bytes
  read counted below the reader.
* NCCL (``cpu:gloo,cuda:nccl``): only when the machine has one GPU per rank; otherwise
  reported as skipped.

Run: ``python benchmarks/device_coop_cuda.py``
"""

from __future__ import annotations

import os
import sys
import tempfile
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))


def _to_cuda(obj: Any) -> Any:
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.cuda()
    if isinstance(obj, dict):
        return {k: _to_cuda(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cuda(v) for v in obj]
    return obj


def cuda_rank(rank: int, world: int, path: str, mode: str) -> dict[str, Any]:
    import _coop_fns as fns
    import torch
    import torch.distributed.checkpoint as dcp

    import dcplan
    from dcplan import compat
    from dcplan.testing.storage import MeteredFileSystemReader

    torch.cuda.set_device(rank % torch.cuda.device_count())
    if mode == "save":
        dcp.save(fns.state("ddp", rank, world, seed=0), storage_writer=dcp.FileSystemWriter(path),
                 planner=compat.torch_default_save_planner())
        return {"digest": fns.digest(fns.state("ddp", rank, world, seed=0))}
    sd = _to_cuda(fns.state("ddp", rank, world, seed=100))
    reader = MeteredFileSystemReader(path)
    planner = compat.torch_default_load_planner() if mode == "torch" else dcplan.LoadPlanner(load_strategy=mode)
    dcp.load(sd, storage_reader=reader, planner=planner)
    flat, _ = compat.flatten_state_dict(sd)
    on_cuda = all(v.is_cuda for v in flat.values() if isinstance(v, torch.Tensor))
    stats = getattr(planner, "load_stats", None)
    return {"digest": fns.digest(sd), "bytes": reader.meter.bytes_read, "on_cuda": on_cuda,
            "mode": getattr(stats, "mode", None), "device": None if stats is None else stats.reason}


def main() -> int:
    import torch

    from dcplan.testing.procs import GlooPool

    print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.device_count(), "GPU(s)")
    ok = True
    with tempfile.TemporaryDirectory() as tmp, GlooPool(4, timeout=240) as pool:
        saved = pool.run(cuda_rank, tmp, "save")
        ref = pool.run(cuda_rank, tmp, "torch")
        coop = pool.run(cuda_rank, tmp, "cooperative")
        for r, (s, a, b) in enumerate(zip(saved, ref, coop)):
            same = s["digest"] == a["digest"] == b["digest"]
            ok = ok and same and b["on_cuda"] and b["mode"] == "coop"
            print(f"gloo+cuda rank {r}: bit-exact={same} on_cuda={b['on_cuda']} mode={b['mode']} "
                  f"bytes torch={a['bytes']} coop={b['bytes']}")
        print("total bytes torch", sum(a["bytes"] for a in ref), "coop", sum(b["bytes"] for b in coop))
    if torch.cuda.device_count() < 2:
        print("nccl: skipped (one GPU; NCCL needs one GPU per rank)")
    print("DEVICE CHECK", "OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
