"""Device check (needs a CUDA GPU): CUDA tensors through dcplan's save, async_save and load.

* gloo, 2 ranks sharing the GPU: a replicated + sharded state of CUDA tensors is saved with
  ``dcplan.save`` (default strategy, checksums, atomic commit), overwritten with
  ``dcplan.async_save``, verified (``dcplan verify``) and loaded back into CUDA tensors with
  ``dcplan.load`` (default and ``cooperative``) and with torch's stock reader: bit-exact.
* NCCL, 1 rank: ``dcplan.save`` / ``dcplan.load`` on CUDA through an NCCL process group.
* then ``device_coop_cuda.py`` (4 gloo ranks, cooperative load into CUDA tensors).

Run: ``python benchmarks/device_check.py``; prints ``DEVICE CHECK OK`` or ``FAILED``.
"""

from __future__ import annotations

import os
import sys
import tempfile
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def _state(rank: int, world: int, seed: int) -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(seed)
    rep = {f"layer{i}.weight": torch.randn(256, 128, generator=g).cuda() for i in range(6)}
    rep["emb"] = torch.randn(1000, 64, generator=g).to(torch.bfloat16).cuda()
    local = torch.randn(64, 32, generator=torch.Generator().manual_seed(seed + 1000 + rank)).cuda()
    return {"model": rep, f"rank{rank}_state": local, "step": seed}


def _digest(sd: dict[str, Any]) -> dict[str, Any]:
    import hashlib

    import torch

    from dcplan import compat

    flat, _ = compat.flatten_state_dict(sd)
    out = {}
    for k, v in flat.items():
        if isinstance(v, torch.Tensor):
            out[k] = (str(v.dtype), v.is_cuda, hashlib.sha256(v.detach().cpu().contiguous().view(torch.uint8).numpy()).hexdigest())
        else:
            out[k] = repr(v)
    return out


def storage_rank(rank: int, world: int, path: str) -> dict[str, Any]:
    import torch
    import torch.distributed.checkpoint as dcp

    import dcplan
    from dcplan.storage.verify import verify_checkpoint

    torch.cuda.set_device(0)
    dcplan.save(_state(rank, world, 1), path)
    fut = dcplan.async_save(_state(rank, world, 2), path)
    fut.result()
    torch.distributed.barrier()
    ok_verify = verify_checkpoint(path).ok if rank == 0 else True
    want = _digest(_state(rank, world, 2))
    got = {}
    for mode in ("default", "cooperative"):
        sd = _state(rank, world, 99)
        dcplan.load(sd, path, load_strategy=mode)
        got[mode] = _digest(sd) == want
    sd = _state(rank, world, 99)
    dcp.load(sd, checkpoint_id=path, storage_reader=dcp.FileSystemReader(path))
    got["torch_reader"] = {k: v for k, v in _digest(sd).items() if k != "step"} == {
        k: v for k, v in want.items() if k != "step"}
    return {"verify": ok_verify, **got}


def nccl_single(path: str) -> bool:
    import torch.distributed as dist

    import dcplan

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("cpu:gloo,cuda:nccl", rank=0, world_size=1)
    try:
        dcplan.save(_state(0, 1, 5), path)
        sd = _state(0, 1, 77)
        dcplan.load(sd, path, load_strategy="cooperative")
        return _digest(sd) == _digest(_state(0, 1, 5))
    finally:
        dist.destroy_process_group()


def main() -> int:
    import torch

    from dcplan.testing.procs import GlooPool

    print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.device_count(), "GPU(s)")
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        with GlooPool(2, timeout=240) as pool:
            res = pool.run(storage_rank, os.path.join(tmp, "ckpt"))
        for r, x in enumerate(res):
            print(f"gloo+cuda storage rank {r}: {x}")
            ok = ok and all(x.values())
        nccl = nccl_single(os.path.join(tmp, "nccl"))
        print("nccl 1 rank save/load bit-exact:", nccl)
        ok = ok and nccl
    import device_coop_cuda

    ok = device_coop_cuda.main() == 0 and ok
    print("DEVICE CHECK (all)", "OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
