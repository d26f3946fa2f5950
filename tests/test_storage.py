"""dcplan's storage: atomic overwrite under crashes, checksums, confined paths, clear errors, ``dcplan verify``.

Crash tests run real gloo ranks (forked, 2 ranks) that save checkpoint B over checkpoint A
and die at a chosen moment through the writer's test hook (``_DCPLAN_TEST_CRASH_AT``); the
test process then loads the path and must get A bit-exact (crash before the commit) or B
(after it), through dcplan's reader and through torch's stock reader, never a mixture.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import queue
import shutil
import time
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp

import dcplan
from dcplan import compat
from dcplan.cli.main import main as cli_main
from dcplan.storage.checksum import sidecar_name
from dcplan.storage.verify import verify_checkpoint
from dcplan.storage.writer import CRASH_ENV, FileSystemWriter
from dcplan.testing.procs import free_port

pytestmark = [
    pytest.mark.filterwarnings("ignore:torch.distributed is disabled"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

WORLD = 2


# ---------------------------------------------------------------- state dicts
def _state(version: int, rank: int | None = None, world: int = WORLD) -> dict[str, Any]:
    """Rank ``rank``'s state for save ``version`` (``rank=None``: all ranks' keys, what one loader reads)."""
    base = torch.arange(4096, dtype=torch.float32) + 1000 * version
    sd: dict[str, Any] = {
        "shared": base.reshape(64, 64).clone(),  # replicated: deduplicated on save
        "bf16": (base[:100] / 3).to(torch.bfloat16),
        "meta": {"version": version, "tag": f"v{version}"},
    }
    for r in range(world):
        if rank is None or r == rank:
            sd[f"rank{r}"] = torch.full((256,), float(version * 10 + r))
    return sd


def _blank(sd: dict[str, Any]) -> dict[str, Any]:
    def blank(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return torch.zeros_like(v)
        return {k: blank(x) for k, x in v.items()} if isinstance(v, dict) else None

    return blank(sd)


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if set(a) != set(b):
        return False
    for k in a:
        if isinstance(a[k], dict):
            if not (isinstance(b[k], dict) and _same(a[k], b[k])):
                return False
        elif isinstance(a[k], torch.Tensor):
            if not (isinstance(b[k], torch.Tensor) and a[k].dtype == b[k].dtype and torch.equal(a[k], b[k])):
                return False
        elif a[k] != b[k]:
            return False
    return True


def _load_dcplan(path: str | Path, **kw: Any) -> dict[str, Any]:
    sd = _blank(_state(0))
    dcplan.load(sd, str(path), **kw)
    return sd


def _single(fn: Any) -> dict[str, Any]:
    """One process, no process group: ``no_dist=True`` where this torch takes it (2.7+); older ones infer it."""
    return compat.dcp_call_kwargs(fn, None)


def _load_stock(path: str | Path) -> dict[str, Any]:
    """torch's own reader and default planner, nothing of dcplan's."""
    sd = _blank(_state(0))
    dcp.load(sd, storage_reader=dcp.FileSystemReader(str(path)),
             planner=dcp.DefaultLoadPlanner(), **_single(dcp.load))
    return sd


# ---------------------------------------------------------------- forked gloo ranks
def _rank_main(rank: int, world: int, port: int, fn: Any, args: tuple, env: dict[str, str], out: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    os.environ.update(env)
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        out.put((rank, "ok", fn(rank, world, *args)))
    except BaseException as exc:  # noqa: BLE001
        out.put((rank, "err", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    out.close()
    out.join_thread()
    os._exit(0)


def run_ranks(fn: Any, *args: Any, env: dict[str, str] | None = None, world: int = WORLD,
              timeout: float = 60.0) -> dict[int, tuple[str, Any, int | None]]:
    """``fn(rank, world, *args)`` on ``world`` forked gloo ranks: ``{rank: (status, value, exitcode)}``.

    A rank that died without answering has status ``"died"``. Forking (the parent has torch
    imported) starts a rank in milliseconds, which keeps the crash tests fast.
    """
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, fn, args, dict(env or {}), out))
             for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, tuple[str, Any, int | None]] = {}
    deadline = time.monotonic() + timeout
    while len(results) < world and time.monotonic() < deadline:
        try:
            rank, status, value = out.get(timeout=0.2)
            results[rank] = (status, value, None)
        except queue.Empty:
            if all(not p.is_alive() for p in procs):
                try:
                    while True:
                        rank, status, value = out.get(timeout=0.5)
                        results[rank] = (status, value, None)
                except queue.Empty:
                    break
    for p in procs:
        p.join(timeout=max(0.1, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join(5)
    return {r: (results[r][0] if r in results else "died", results.get(r, (None, None))[1], procs[r].exitcode)
            for r in range(world)}


def _save_rank(rank: int, world: int, path: str, version: int, crash: str | None) -> str:
    if crash:
        os.environ[CRASH_ENV] = crash
    dcp.save(_state(version, rank, world), storage_writer=FileSystemWriter(path), planner=dcplan.SavePlanner(report=False))
    return "saved"


def _async_save_rank(rank: int, world: int, path: str, version: int) -> str:
    fut = dcp.async_save(_state(version, rank, world), storage_writer=FileSystemWriter(path),
                         planner=dcplan.SavePlanner(report=False))
    fut.result()
    return "saved"


def _api_round_trip_rank(rank: int, world: int, path: str) -> bool:
    dcplan.save(_state(3, rank, world), path)
    sd = _blank(_state(3, rank, world))
    dcplan.load(sd, path)
    return _same(sd, _state(3, rank, world))


@pytest.fixture(scope="module")
def ckpt_a(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Checkpoint A, saved by two gloo ranks with dcplan's writer (copied per test)."""
    path = tmp_path_factory.mktemp("a") / "ckpt"
    res = run_ranks(_save_rank, str(path), 1, None)
    assert all(s == "ok" for s, _, _ in res.values()), res
    return path


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------- crashes while overwriting
@pytest.mark.multiproc
@pytest.mark.parametrize("crash, committed", [
    ("write_data@1", False),           # a rank dies while writing its data
    ("write_data@0", False),           # the coordinator dies while writing its data
    ("finish.start@0", False),         # the coordinator dies before finish does anything
    ("finish.before_commit@0", False),  # ... in finish, checksums and .metadata written, not committed
    ("finish.after_commit@0", True),    # ... in finish, after the commit, before the clean-up
])
def test_crash_while_overwriting_leaves_old_or_new_never_a_mixture(ckpt_a: Path, tmp_path: Path, crash: str,
                                                                  committed: bool) -> None:
    path = _copy(ckpt_a, tmp_path)
    res = run_ranks(_save_rank, str(path), 2, crash, timeout=60)
    who = int(crash.split("@")[1])
    assert res[who][0] == "died" and res[who][2] == 86, res  # the hook fired
    expected = _state(2 if committed else 1)
    assert _same(_load_dcplan(path), expected)
    assert _same(_load_stock(path), expected)  # torch's own reader sees the same complete checkpoint
    report = verify_checkpoint(path)
    assert report.ok and report.checksums == "verified", report.problems
    assert report.leftovers  # what the interrupted save wrote is reported...
    res = run_ranks(_save_rank, str(path), 4, None)
    assert all(s == "ok" for s, _, _ in res.values()), res
    report = verify_checkpoint(path)
    assert report.ok and not report.leftovers  # ...and removed by the next save
    assert _same(_load_dcplan(path), _state(4))


@pytest.mark.multiproc
def test_async_save_with_dcplan_writer_and_api_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "ckpt"
    res = run_ranks(_async_save_rank, str(path), 5)
    assert all(s == "ok" for s, _, _ in res.values()), res
    assert verify_checkpoint(path).ok
    assert _same(_load_stock(path), _state(5))
    res = run_ranks(_api_round_trip_rank, str(tmp_path / "api"))
    assert [v for _, v, _ in res.values()] == [True, True], res


# ---------------------------------------------------------------- damaged data
def _data_files(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.suffix == ".distcp")


def _dcplan_error(path: Path, **kw: Any) -> str:
    with pytest.raises(dcplan.CorruptCheckpointError) as info:
        _load_dcplan(path, **kw)
    return str(info.value)


def test_stock_reader_loads_dcplan_checkpoint_bit_exact(ckpt_a: Path) -> None:
    assert _same(_load_stock(ckpt_a), _state(1))
    assert _same(_load_dcplan(ckpt_a), _state(1))
    names = [p.name for p in _data_files(ckpt_a)]
    assert len(names) == 2 and all(n.startswith(("__0_", "__1_")) for n in names)


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_flipped_byte_is_caught_by_load_and_verify(ckpt_a: Path, tmp_path: Path, where: str) -> None:
    path = _copy(ckpt_a, tmp_path)
    f = _data_files(path)[0]
    data = bytearray(f.read_bytes())
    pos = {"first": 0, "middle": len(data) // 2, "last": len(data) - 1}[where]
    data[pos] ^= 0x01
    f.write_bytes(bytes(data))
    msg = _dcplan_error(path)
    assert "checksum mismatch" in msg and f.name in msg and "offset" in msg and "item" in msg
    report = verify_checkpoint(path)
    assert not report.ok and [p.kind for p in report.problems] == ["checksum"]
    assert cli_main(["verify", str(path)]) == 1
    # the documented switch: skip the check (the bytes then decode or fail on their own)
    try:
        _load_dcplan(path, verify_checksums=False)
    except BaseException as exc:  # noqa: BLE001 - a damaged header may not decode; never silently right
        assert "cannot be decoded" in str(exc) or "CheckpointException" in type(exc).__name__


@pytest.mark.parametrize("damage", ["truncate", "empty", "delete"])
def test_truncated_empty_missing_data_file_errors_name_the_file(ckpt_a: Path, tmp_path: Path, damage: str) -> None:
    path = _copy(ckpt_a, tmp_path)
    f = _data_files(path)[1]
    if damage == "truncate":
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif damage == "empty":
        f.write_bytes(b"")
    else:
        f.unlink()
    for kw in ({}, {"verify_checksums": False}):
        msg = _dcplan_error(path, **kw)
        assert f.name in msg
        word = {"truncate": "truncated", "empty": "empty (0 bytes)", "delete": "missing"}[damage]
        assert word in msg and ("needs bytes" in msg or "expects it" in msg)
    report = verify_checkpoint(path, checksums=False)
    kinds = {p.kind for p in report.problems}
    assert kinds == {{"truncate": "truncated", "empty": "empty", "delete": "missing"}[damage]}
    assert cli_main(["verify", str(path), "--json"]) == 1


def test_missing_checksum_file_is_an_error_unless_skipped(ckpt_a: Path, tmp_path: Path) -> None:
    path = _copy(ckpt_a, tmp_path)
    (sidecar,) = [p for p in path.iterdir() if p.name.endswith(".checksums.json")]
    sidecar.unlink()
    assert "checksum file" in _dcplan_error(path)
    assert _same(_load_dcplan(path, verify_checksums=False), _state(1))
    assert not verify_checkpoint(path).ok


def _rewrite_paths(path: Path, new_rel: Any) -> None:
    md_path = path / ".metadata"
    md = pickle.loads(md_path.read_bytes())
    first = sorted(md.storage_data, key=lambda i: (i.fqn, tuple(i.offset or ())))[0]
    md.storage_data[first].relative_path = new_rel(md.storage_data[first].relative_path)
    md_path.write_bytes(pickle.dumps(md))


@pytest.mark.parametrize("escape", ["dotdot", "absolute", "symlink"])
def test_storage_paths_outside_the_directory_are_refused(ckpt_a: Path, tmp_path: Path, escape: str) -> None:
    path = _copy(ckpt_a, tmp_path)
    outside = tmp_path / "secret.bin"
    shutil.copy(_data_files(path)[0], outside)  # same bytes: only the confinement check can refuse them
    if escape == "dotdot":
        _rewrite_paths(path, lambda rel: "../secret.bin")
    elif escape == "absolute":
        _rewrite_paths(path, lambda rel: str(outside))
    else:
        target = _data_files(path)[0]
        target.unlink()
        target.symlink_to(outside)
    with pytest.raises(dcplan.CheckpointPathError, match="outside the checkpoint directory"):
        _load_dcplan(path, verify_checksums=False)
    report = verify_checkpoint(path)
    assert "path" in {p.kind for p in report.problems}


def test_torch_written_checkpoint_loads_without_checksums_and_verifies(tmp_path: Path) -> None:
    path = tmp_path / "torch"
    dcp.save(_state(7), storage_writer=dcp.FileSystemWriter(str(path)), **_single(dcp.save))
    assert _same(_load_dcplan(path), _state(7))
    report = verify_checkpoint(path)
    assert report.ok and report.checksums == "absent"
    dcplan.save(_state(8), str(path))  # overwriting torch's checkpoint removes its files once committed
    assert _same(_load_stock(path), _state(8)) and not verify_checkpoint(path).leftovers


def test_writer_reused_without_reset_never_overwrites_committed_files(tmp_path: Path) -> None:
    path = tmp_path / "ckpt"
    writer = FileSystemWriter(str(path))
    dcp.save(_state(1), storage_writer=writer, **_single(dcp.save))
    first = {p.name for p in _data_files(path)}
    dcp.save(_state(2), storage_writer=writer, **_single(dcp.save))
    second = {p.name for p in _data_files(path)}
    assert first and second and not first & second
    assert _same(_load_dcplan(path), _state(2))
    side = json.loads((path / sidecar_name(pickle.loads((path / ".metadata").read_bytes()).storage_meta.save_id))
                      .read_text())
    assert side["algorithm"] == "xxh3_64" and set(side["files"]) == second


def test_no_checksums_and_no_fsync_options(tmp_path: Path) -> None:
    path = tmp_path / "ckpt"
    dcplan.save(_state(1), str(path), checksums=False, sync_files=False)
    assert not [p for p in path.iterdir() if p.name.endswith(".checksums.json")]
    assert _same(_load_dcplan(path), _state(1))
    assert verify_checkpoint(path).checksums == "absent"


def test_cli_inspect_says_metadata_only_and_convert_names_the_file(ckpt_a: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    path = _copy(ckpt_a, tmp_path)
    _data_files(path)[0].write_bytes(b"")
    assert cli_main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "dcplan verify" in out and "metadata only" in out
    assert f"{_data_files(path)[0].name}" in out and "[EMPTY]" in out and "WARNING" in out
    rc = cli_main(["convert", str(path), str(tmp_path / "out.pt")])
    err = capsys.readouterr().err
    assert rc == 2 and _data_files(path)[0].name in err and "empty" in err and "EOFError" not in err


@pytest.mark.parametrize("options", [{"thread_count": 2}, {"single_file_per_rank": False}])
def test_writer_options_pass_through_and_every_item_is_checksummed(tmp_path: Path, options: dict) -> None:
    path = tmp_path / "ckpt"
    dcp.save(_state(6), storage_writer=FileSystemWriter(str(path), **options), **_single(dcp.save))
    report = verify_checkpoint(path)
    assert report.ok and report.checksums == "verified" and report.checked_items == report.items
    assert _same(_load_stock(path), _state(6)) and _same(_load_dcplan(path), _state(6))
