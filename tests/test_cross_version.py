"""Checkpoints written by dcplan on other torch versions load here (or are refused clearly).

``tests/data/xver/torch-<version>/`` hold real checkpoints, each written by
``python tools/xver.py write`` with two gloo ranks on that torch version. Every tox
environment loads each of them with ``dcplan.LoadPlanner`` and compares bit for bit; a
checkpoint written with checksums (``dcplan.FileSystemWriter``, ``"checksums": true`` in
``xver.json``) must also pass ``dcplan verify`` here, and a flipped byte must be caught.
Whether a checkpoint must load or be refused follows from the writer's recorded
feature flags (``xver.json``) and this torch's, never from version strings. The
``xver`` tox environment does the same live, across all six torch versions.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from dcplan import compat
from dcplan.cli.main import main as cli_main
from dcplan.testing.xver import MANIFEST, read_checkpoint

DATA = Path(__file__).parent / "data" / "xver"
CHECKPOINTS = sorted(p for p in DATA.glob("torch-*") if (p / MANIFEST).is_file())


def _manifest(path: Path) -> dict:
    return json.loads((path / MANIFEST).read_text())


def _expect_refused(path: Path) -> bool:
    return bool(_manifest(path)["has_strides"]) and not compat.HAS_STRIDES


def test_committed_checkpoints_span_both_formats() -> None:
    """Never silently test nothing: one pre-2.15 and one 2.15 checkpoint must be here."""
    formats = {bool(_manifest(p)["has_strides"]) for p in CHECKPOINTS}
    assert formats == {False, True}, f"expected a 5-field and a 6-field checkpoint under {DATA}, got {CHECKPOINTS}"


CHECKSUMMED = [p for p in CHECKPOINTS if _manifest(p).get("checksums")]


def test_a_committed_checkpoint_carries_checksums() -> None:
    """Never silently test nothing: one checkpoint written by dcplan's writer (checksums on) must be here."""
    assert CHECKSUMMED, f"expected a checkpoint written with checksums under {DATA} (python tools/xver.py write)"


@pytest.mark.parametrize("ckpt", CHECKSUMMED, ids=[p.name for p in CHECKSUMMED])
def test_checksums_written_by_another_torch_catch_a_flipped_byte(ckpt: Path, tmp_path: Path) -> None:
    path = tmp_path / ckpt.name
    shutil.copytree(ckpt, path)
    data_file = sorted(path.glob("*.distcp"))[0]
    raw = bytearray(data_file.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    data_file.write_bytes(bytes(raw))
    status, detail = read_checkpoint(path)
    if _expect_refused(ckpt):
        assert status == "refused", detail
    else:
        assert status == "bad" and "checksum mismatch" in detail and data_file.name in detail, detail


@pytest.mark.parametrize("ckpt", CHECKPOINTS, ids=[p.name for p in CHECKPOINTS])
def test_load_checkpoint_written_by_another_torch(ckpt: Path, tmp_path: Path) -> None:
    path = tmp_path / ckpt.name
    shutil.copytree(ckpt, path)  # loading never writes, but keep the committed files out of reach
    status, detail = read_checkpoint(path)
    if _expect_refused(ckpt):
        assert status == "refused", detail
        assert f"torch {torch.__version__}" in detail and ">= 2.15" in detail and "<= 2.14" in detail
    else:
        assert (status, detail) == ("ok", "")


@pytest.mark.parametrize("ckpt", CHECKPOINTS, ids=[p.name for p in CHECKPOINTS])
def test_cli_inspect_checkpoint_written_by_another_torch(ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli_main(["inspect", str(ckpt)])
    out, err = capsys.readouterr()
    if _expect_refused(ckpt):
        assert rc == 2 and "written by a newer torch (>= 2.15" in err and "Traceback" not in err
    else:
        assert rc == 0, err
        assert "model.w" in out
