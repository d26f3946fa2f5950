"""``dcplan inspect``: keys, sizes, files and versions; one-line errors, never a traceback."""

from __future__ import annotations

import json
import os
import pickle
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp

from dcplan import compat
from dcplan.cli.main import main


@pytest.fixture()
def ckpt(tmp_path):
    path = str(tmp_path / "ck")
    sd = {"model": {"w": torch.ones(4, 3), "h": torch.zeros(5, dtype=torch.float16)},
          "optim": {"state": {0: {"m": torch.ones(2)}}}, "step": 9, "name": "run"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(sd, storage_writer=dcp.FileSystemWriter(path), planner=compat.torch_default_save_planner())
    return path


def test_json_lists_every_key_totals_files_and_versions(ckpt, capsys):
    assert main(["inspect", ckpt, "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    rows = {r["key"]: r for r in d["keys"]}
    assert sorted(rows) == ["model.h", "model.w", "name", "optim.state.0.m", "step"]
    assert rows["model.w"] == {**rows["model.w"], "kind": "tensor", "shape": [4, 3], "dtype": "float32",
                               "bytes": 48, "chunks": 1, "nested": "model['w']"}
    assert rows["model.h"]["dtype"] == "float16" and rows["model.h"]["bytes"] == 10
    assert rows["step"]["kind"] == "object" and rows["step"]["bytes"] > 0
    assert d["totals"]["keys"] == 5 and d["totals"]["tensors"] == 3 and d["totals"]["objects"] == 2
    assert d["totals"]["bytes"] == sum(r["bytes"] for r in d["keys"])
    assert d["files"] and sum(len(f["keys"]) for f in d["files"]) == 5
    assert d["version"] == compat.metadata_version(pickle.load(open(os.path.join(ckpt, ".metadata"), "rb")))
    if compat.HAS_STORAGE_META:
        assert d["storage_meta"]["checkpoint_id"].endswith("ck")


def test_text_output(ckpt, capsys):
    assert main(["inspect", ckpt]) == 0
    out = capsys.readouterr().out
    assert "model.w" in out and "4x3" in out and "float32" in out
    assert "total: 5 keys (3 tensors, 2 objects)" in out
    assert "__0_0.distcp" in out


def _truncate(path: str) -> str:
    meta = os.path.join(path, ".metadata")
    data = open(meta, "rb").read()
    open(meta, "wb").write(data[:40])
    return path


@pytest.mark.parametrize("case,match", [
    ("missing", "does not exist"),
    ("empty_dir", "not a DCP checkpoint: it has no .metadata"),
    ("file", "not a directory"),
    ("truncated", "truncated or corrupted"),
    ("garbage", "corrupted"),
    ("not_metadata", "does not hold DCP metadata"),
])
def test_bad_checkpoints_give_one_line_errors(ckpt, tmp_path, capsys, case, match):
    if case == "missing":
        path = str(tmp_path / "nope")
    elif case == "empty_dir":
        path = str(tmp_path / "empty")
        os.mkdir(path)
    elif case == "file":
        path = os.path.join(ckpt, "__0_0.distcp")
    elif case == "truncated":
        path = _truncate(ckpt)
    else:
        path = ckpt
        payload = b"\x80\x04garbage" if case == "garbage" else pickle.dumps([1, 2])
        open(os.path.join(ckpt, ".metadata"), "wb").write(payload)
    for extra in ([], ["--json"]):
        assert main(["inspect", path, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("dcplan: error:") and match in err, err
        assert "\n" not in err and "Traceback" not in err


def test_trust_reads_with_full_pickle(ckpt, capsys):
    assert main(["inspect", ckpt, "--trust", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["totals"]["keys"] == 5


def test_json_planner_data_is_structured(ckpt, capsys):
    """``planner_data`` is the flattening mapping as data, not a count in a string (issue 18)."""
    assert main(["inspect", ckpt, "--json"]) == 0
    pd = json.loads(capsys.readouterr().out)["planner_data"]
    assert pd["model.w"] == ["model", "w"] and list(map(str, pd["optim.state.0.m"])) == ["optim", "state", "0", "m"]
    assert main(["inspect", ckpt]) == 0
    assert f"planner_data: {len(pd)} entries" in capsys.readouterr().out
