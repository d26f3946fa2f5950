"""Save and load throughput: dcplan's writer and reader (checksums on) vs torch's, same state, one run.

    python benchmarks/bench_storage.py [--gib 1.0] [--tensors 16] [--repeat 3] [--dir D] [--no-sync] [--json out.json]

One process (``no_dist``) saves the same state (``--gib`` GiB of float32 in ``--tensors``
tensors, plus a few small objects) with torch's ``FileSystemWriter`` and with
``dcplan.FileSystemWriter`` (atomic commit, checksums computed while writing), then loads
it back with torch's ``FileSystemReader`` and ``dcplan.FileSystemReader`` (safe
``.metadata``, confined paths, checksums verified). Both use torch's default planners, so
only the storage layer differs. Each repeat alternates the order; the best time of each
variant is reported, wall-clock and CPU time (the CPU time of this process is what a shared
machine perturbs least), with the ratio dcplan / torch (target: at most 1.10). Both sides fsync
(``sync_files=True``) unless ``--no-sync``. Loads read hot files from the page cache, which
is where a reader's own overhead shows most.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

import dcplan


def make_state(gib: float, tensors: int) -> dict[str, Any]:
    per = int(gib * (1 << 30) / 4 / tensors)
    gen = torch.Generator().manual_seed(0)
    sd: dict[str, Any] = {f"layer{i}.weight": torch.randn(per, generator=gen) for i in range(tensors)}
    sd["step"] = torch.tensor(1000)
    sd["meta"] = {"epoch": 3, "name": "bench"}
    return sd


def blank(sd: dict[str, Any]) -> dict[str, Any]:
    return {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else ({kk: None for kk in v} if isinstance(v, dict)
            else None) for k, v in sd.items()}


def save_with(kind: str, sd: dict[str, Any], path: str, sync: bool) -> tuple[float, float]:
    """(wall, CPU) seconds of one save."""
    writer = (dcp.FileSystemWriter(path, sync_files=sync) if kind == "torch"
              else dcplan.FileSystemWriter(path, sync_files=sync, checksums=kind == "dcplan"))
    t0, c0 = time.perf_counter(), time.process_time()
    dcp.save(sd, storage_writer=writer, planner=dcp.DefaultSavePlanner(), no_dist=True)
    return time.perf_counter() - t0, time.process_time() - c0


def load_with(kind: str, target: dict[str, Any], path: str) -> tuple[float, float]:
    """(wall, CPU) seconds of one load."""
    reader = dcp.FileSystemReader(path) if kind == "torch" else dcplan.FileSystemReader(path)
    t0, c0 = time.perf_counter(), time.process_time()
    dcp.load(target, storage_reader=reader, planner=dcp.DefaultLoadPlanner(), no_dist=True)
    return time.perf_counter() - t0, time.process_time() - c0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--tensors", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    ap.add_argument("--no-sync", action="store_true", help="sync_files=False on both sides")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    root = tempfile.mkdtemp(prefix="bench-storage-", dir=args.dir)
    sd = make_state(args.gib, args.tensors)
    nbytes = sum(v.numel() * v.element_size() for v in sd.values() if isinstance(v, torch.Tensor))
    kinds = ["torch", "dcplan"]
    times: dict[str, dict[str, list[tuple[float, float]]]] = {k: {"save": [], "load": []} for k in kinds}
    target = blank(sd)
    try:
        for rep in range(args.repeat):
            for kind in (kinds if rep % 2 == 0 else kinds[::-1]):
                path = os.path.join(root, f"{kind}-{rep}")
                times[kind]["save"].append(save_with(kind, sd, path, not args.no_sync))
                times[kind]["load"].append(load_with(kind, target, path))
                bad = [k for k, v in sd.items() if isinstance(v, torch.Tensor) and not torch.equal(v, target[k])]
                if bad:
                    raise SystemExit(f"{kind}: loaded values differ for {bad[:3]}")
                shutil.rmtree(path)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    gb = nbytes / 1e9
    result: dict[str, Any] = {"torch_version": torch.__version__, "bytes": nbytes, "repeat": args.repeat,
                              "sync_files": not args.no_sync}
    print(f"state: {nbytes / (1 << 30):.2f} GiB in {args.tensors} tensors; torch {torch.__version__}; "
          f"sync_files={not args.no_sync}; best of {args.repeat}")
    print(f"{'':8} {'torch wall':>18} {'dcplan wall':>18} {'ratio':>6}   {'torch CPU':>9} {'dcplan CPU':>10} {'ratio':>6}")
    for op in ("save", "load"):
        w_torch, w_dcplan = (min(w for w, _ in times[k][op]) for k in kinds)
        c_torch, c_dcplan = (min(c for _, c in times[k][op]) for k in kinds)
        result[op] = {"torch_s": w_torch, "dcplan_s": w_dcplan, "ratio": w_dcplan / w_torch,
                      "torch_cpu_s": c_torch, "dcplan_cpu_s": c_dcplan, "cpu_ratio": c_dcplan / c_torch,
                      "torch_gbps": gb / w_torch, "dcplan_gbps": gb / w_dcplan,
                      "all": {k: times[k][op] for k in kinds}}
        print(f"{op:8} {w_torch:7.3f}s {gb / w_torch:5.2f}GB/s {w_dcplan:7.3f}s {gb / w_dcplan:5.2f}GB/s "
              f"{w_dcplan / w_torch:6.3f}   {c_torch:8.3f}s {c_dcplan:9.3f}s {c_dcplan / c_torch:6.3f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
