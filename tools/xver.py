"""Cross-version checkpoints: a checkpoint saved by dcplan on one torch loads on another.

Three modes::

    python tools/xver.py write DIR      # 2 real gloo ranks save the reference state with dcplan.SavePlanner
                                        # and dcplan.FileSystemWriter (checksums on)
    python tools/xver.py read DIR...    # dcplan verify each DIR (checksums must match), then load it with
                                        # dcplan.LoadPlanner + dcplan.FileSystemReader (one process), bit for bit
    python tools/xver.py matrix --toxworkdir .tox --work W torch24 torch215 ...

``matrix`` drives the interpreters of other tox environments
(``<toxworkdir>/<env>/bin/python``): every environment writes a checkpoint, then every
environment reads every checkpoint. A reader whose torch cannot read the writer's
metadata format (``TensorProperties.strides``, written from torch 2.15) must fail with
dcplan's :class:`~dcplan.load.safe.MetadataVersionError` naming both versions; anything
else (wrong values, another error, a crash) fails the run. A missing environment is an
error, never a skip: the matrix is only meaningful when all of it ran.

``write`` records what it knows about its torch in ``DIR/xver.json``; expectations are
derived from those feature flags, never from version strings.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

#: exit code of ``read`` when a checkpoint was refused with dcplan's format error (as designed)
REFUSED = 3
#: written by the writer next to the checkpoint (see dcplan.testing.xver)
MANIFEST = "xver.json"


def cmd_write(path: Path) -> int:
    import torch

    from dcplan.testing.procs import GlooPool
    from dcplan.testing.xver import WORLD_SIZE, write_checkpoint

    with GlooPool(WORLD_SIZE, timeout=300) as pool:
        write_checkpoint(pool, path)
    print(f"xver: torch {torch.__version__} wrote {path}")
    return 0


def cmd_read(paths: list[Path]) -> int:
    import torch

    from dcplan.testing.xver import read_checkpoint

    codes = []
    for path in paths:
        status, detail = read_checkpoint(path)
        print(f"xver: torch {torch.__version__} read {path}: {status} {detail}".rstrip(), flush=True)
        codes.append({"ok": 0, "refused": REFUSED}.get(status, 1))
    return 1 if 1 in codes else max(codes, default=0)


# ---------------------------------------------------------------- matrix (drives other envs)
def _python(toxworkdir: Path, env: str) -> Path:
    for rel in ("bin/python", "Scripts/python.exe"):
        exe = toxworkdir / env / rel
        if exe.exists():
            return exe
    raise SystemExit(
        f"xver: no interpreter for tox environment {env!r} under {toxworkdir}. "
        f"Build it first: tox -e {env} (or run the whole matrix: tox); this check is never skipped."
    )


def _run(exe: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    return subprocess.run(
        [str(exe), os.path.abspath(__file__), *args], capture_output=True, text=True, env=env, timeout=600
    )


def cmd_matrix(toxworkdir: Path, work: Path, envs: list[str], jobs: int = 3) -> int:
    exes = {env: _python(toxworkdir, env) for env in envs}
    work.mkdir(parents=True, exist_ok=True)
    failures: list[str] = []
    t0 = time.perf_counter()
    # Interpreter start-up and torch imports dominate: a few at a time overlap that waiting.
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        writes = dict(zip(exes, pool.map(lambda e: _run(exes[e], "write", str(work / e)), exes)))
    print(f"xver: {len(exes)} writes in {time.perf_counter() - t0:.1f}s")
    for env, out in writes.items():
        print(f"[{env}] write: {out.stdout.strip() or out.stderr.strip()[-2000:]}")
        if out.returncode:
            failures.append(f"{env} could not write: {out.stderr.strip()[-2000:]}")
    written = [env for env in envs if (work / env / MANIFEST).exists()]
    cells: dict[tuple[str, str], str] = {}
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        reads = dict(zip(exes, pool.map(lambda e: _run(exes[e], "read", *(str(work / w) for w in written)), exes)))
    print(f"xver: {len(exes)} x {len(written)} reads in {time.perf_counter() - t0:.1f}s")
    for reader, out in reads.items():
        lines = {Path(line.split(" read ", 1)[1].split(":", 1)[0]).name: line for line in out.stdout.splitlines()
                 if line.startswith("xver: ") and " read " in line}
        for writer in written:
            line = lines.get(writer)
            if line is None:
                cells[(writer, reader)] = "CRASH"
                failures.append(f"{reader} reading {writer}: no result\n{out.stderr.strip()[-3000:]}")
                continue
            status = line.split(": ", 2)[-1].split(" ", 1)[0]
            cells[(writer, reader)] = status
            print(f"[{reader}] {line}")
            if status not in ("ok", "refused"):
                failures.append(f"{reader} reading {writer}: {line}")
    width = max(len(e) for e in envs) + 2
    print("\nxver matrix (rows: written by, columns: read by; refused = clear dcplan error as designed)")
    print(" " * width + "".join(f"{e:>{width}}" for e in envs))
    for w in envs:
        print(f"{w:<{width}}" + "".join(f"{cells.get((w, r), 'MISSING'):>{width}}" for r in envs))
    if failures:
        print("\nxver: FAILED\n" + "\n".join(failures), file=sys.stderr)
        return 1
    n_ok = sum(v == "ok" for v in cells.values())
    n_ref = sum(v == "refused" for v in cells.values())
    print(f"\nxver: {n_ok} loads ok, {n_ref} refused with a clear error, 0 failed ({len(envs)} torch versions)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("write")
    p.add_argument("dir", type=Path)
    p = sub.add_parser("read")
    p.add_argument("dirs", type=Path, nargs="+")
    p = sub.add_parser("matrix")
    p.add_argument("--toxworkdir", type=Path, required=True)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--jobs", type=int, default=3, help="interpreters run at once (default 3)")
    p.add_argument("envs", nargs="+")
    args = parser.parse_args(argv)
    if args.cmd == "write":
        return cmd_write(args.dir)
    if args.cmd == "read":
        return cmd_read(args.dirs)
    return cmd_matrix(args.toxworkdir, args.work, args.envs, args.jobs)


if __name__ == "__main__":
    sys.exit(main())
