"""``dcplan convert``: DCP <-> torch.save, bit-exact, safe, never overwriting without --force."""

from __future__ import annotations

import os
import re
import sys
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp

from dcplan import compat
from dcplan.cli.main import main


def _bits(t: torch.Tensor) -> bytes:
    return bytes(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def _state() -> dict:
    g = torch.Generator().manual_seed(1)
    special = torch.tensor([float("nan"), -0.0, float("inf"), 1e-45])
    return {
        "model": {"w": torch.randn(5, 4, generator=g), "b": torch.randn(4, generator=g).to(torch.bfloat16),
                  "special": special, "idx": torch.arange(7, dtype=torch.int64)},
        "optim": {"state": {0: {"exp_avg": torch.randn(5, 4, generator=g)}},
                  "param_groups": [{"lr": 0.5, "betas": (0.9, 0.99), "params": [0]}]},
        "extra": {"epoch": 3, "tag": "x"},
        "layers": [torch.ones(2), torch.zeros(3, dtype=torch.int8)],
    }


@pytest.fixture()
def ckpt(tmp_path):
    path = str(tmp_path / "ck")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(_state(), storage_writer=dcp.FileSystemWriter(path), planner=compat.torch_default_save_planner())
    return path


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and _bits(a) == _bits(b)
    if isinstance(a, dict):
        return set(map(str, a)) == set(map(str, b)) and all(
            _equal(v, b[k] if k in b else b[str(k)]) for k, v in a.items())
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def test_round_trip_dcp_torch_save_dcp_is_bit_exact(ckpt, tmp_path, capsys):
    from dcplan_empty_load import load_checkpoint

    pt = str(tmp_path / "model.pt")
    assert main(["convert", ckpt, pt]) == 0
    loaded = torch.load(pt, weights_only=True)
    assert _equal(_state(), loaded)
    back = str(tmp_path / "back")
    assert main(["convert", "--to-dcp", pt, back]) == 0
    assert _equal(load_checkpoint(ckpt), load_checkpoint(back))
    assert _equal(_state(), load_checkpoint(back))
    assert "wrote" in capsys.readouterr().out


def test_keys_select_a_subset(ckpt, tmp_path):
    pt = str(tmp_path / "model.pt")
    assert main(["convert", ckpt, pt, "--keys", "model", "extra.epoch"]) == 0
    got = torch.load(pt, weights_only=True)
    assert sorted(got) == ["extra", "model"] and got["extra"] == {"epoch": 3}
    assert _equal(_state()["model"], got["model"])


def test_existing_output_needs_force(ckpt, tmp_path, capsys):
    pt = tmp_path / "model.pt"
    pt.write_bytes(b"keep me")
    assert main(["convert", ckpt, str(pt)]) == 2
    err = capsys.readouterr().err
    assert "--force" in err and pt.read_bytes() == b"keep me"
    assert main(["convert", ckpt, str(pt), "--force"]) == 0
    assert pt.read_bytes() != b"keep me"
    assert main(["convert", "--to-dcp", str(pt), ckpt]) == 2  # a non-empty checkpoint directory
    assert "--force" in capsys.readouterr().err
    assert main(["convert", "--to-dcp", str(pt), ckpt, "--force"]) == 0


@pytest.mark.parametrize("case,match", [
    ("missing_ckpt", "does not exist"),
    ("not_ckpt", "no .metadata"),
    ("unknown_key", "match nothing"),
    ("missing_pt", "no such file"),
    ("pt_not_dict", "not a state dict"),
    ("corrupt_pt", "convert failed"),
    ("keys_with_to_dcp", "--keys"),
])
def test_errors_are_one_line(ckpt, tmp_path, capsys, case, match):
    pt = str(tmp_path / "in.pt")
    out = str(tmp_path / "out")
    argv = {
        "missing_ckpt": ["convert", str(tmp_path / "nope"), pt],
        "not_ckpt": ["convert", str(tmp_path), str(tmp_path / "x.pt")],
        "unknown_key": ["convert", ckpt, pt, "--keys", "nothing"],
        "missing_pt": ["convert", "--to-dcp", pt, out],
        "pt_not_dict": ["convert", "--to-dcp", pt, out],
        "corrupt_pt": ["convert", "--to-dcp", pt, out],
        "keys_with_to_dcp": ["convert", "--to-dcp", pt, out, "--keys", "a"],
    }[case]
    if case == "pt_not_dict":
        torch.save([torch.ones(1)], pt)
    elif case == "corrupt_pt":
        open(pt, "wb").write(b"PK\x03\x04 not really a zip")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dcplan: error:") and match in err, err
    assert "\n" not in err and "Traceback" not in err


def test_missing_empty_load_plugin_is_a_clear_error(ckpt, tmp_path, capsys, monkeypatch):
    # convert comes from the dcplan-empty-load plugin (issue 12): without it, the error names the distribution
    monkeypatch.setenv("DCPLAN_DISABLE_PLUGINS", "empty_load")
    assert main(["convert", ckpt, str(tmp_path / "o.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert "dcplan-empty-load" in err and "pip install ./plugins/empty_load" in err and "\n" not in err
    assert not os.path.exists(tmp_path / "o.pt")


def test_core_imports_no_plugin_and_help_imports_no_torch():
    """The core never imports a plugin; building the parser (``dcplan --help``) imports neither torch
    nor the plugin's loader: the plugin's light ``dcplan.cli`` module adds ``convert``."""
    import subprocess
    from pathlib import Path

    core = Path(__file__).resolve().parent.parent / "core" / "dcplan"
    offenders = [str(p) for p in core.rglob("*.py") if re.search(r"^\s*(import|from) dcplan_", p.read_text(), re.M)]
    assert offenders == []
    code = ("import sys, dcplan.cli.main as c; p = c.build_parser(); "
            "print('torch' in sys.modules, 'dcplan_empty_load.loader' in sys.modules, "
            "'convert' in p._subparsers._group_actions[0].choices)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False", "True"]


# ------------------------------------------------------------------ --to safetensors (issue 18)
def _flat_tensors(sd, prefix=""):
    out = {}
    items = sd.items() if isinstance(sd, dict) else enumerate(sd)
    for k, v in items:
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, torch.Tensor):
            out[key] = v
        elif isinstance(v, (dict, list)):
            out.update(_flat_tensors(v, key))
    return out


def test_safetensors_one_shard_round_trip_keeps_dtypes(ckpt, tmp_path, capsys):
    import json

    from safetensors.torch import load_file

    out = str(tmp_path / "hf")
    assert main(["convert", ckpt, out, "--to", "safetensors"]) == 0
    assert "model.safetensors.index.json" in capsys.readouterr().out
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    assert set(index["weight_map"].values()) == {"model.safetensors"}
    loaded = load_file(os.path.join(out, "model.safetensors"))
    expected = _flat_tensors(_state())
    assert set(loaded) == set(expected) == set(index["weight_map"])
    for k, t in expected.items():
        assert _equal(t, loaded[k]), k  # bit-exact, dtype kept (bfloat16, int8, int64, nan/-0.0)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in expected.values())
    objects = index["metadata"]["dcplan_objects"]
    assert objects["extra.epoch"] == 3 and objects["extra.tag"] == "x"
    assert objects["optim.param_groups.0.lr"] == 0.5


def test_safetensors_shards_respect_max_size(ckpt, tmp_path):
    import json

    from safetensors.torch import load_file

    out = str(tmp_path / "hf")
    assert main(["convert", ckpt, out, "--to", "safetensors", "--max-shard-size", "100B"]) == 0
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    merged = {}
    for f in files:
        part = load_file(os.path.join(out, f))
        size = sum(t.numel() * t.element_size() for t in part.values())
        assert size <= 100 or len(part) == 1  # a tensor larger than a shard gets one of its own
        assert all(index["weight_map"][k] == f for k in part)
        merged.update(part)
    expected = _flat_tensors(_state())
    assert set(merged) == set(expected) and all(_equal(expected[k], merged[k]) for k in expected)


def test_safetensors_reports_skipped_objects_and_refuses_overwrite(tmp_path, capsys):
    import json

    path = str(tmp_path / "ck")
    sd = {"w": torch.ones(3), "rng": torch.Generator().manual_seed(3).get_state(), "obj": {1, 2}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(sd, storage_writer=dcp.FileSystemWriter(path), planner=compat.torch_default_save_planner())
    out = str(tmp_path / "hf")
    assert main(["convert", path, out, "--to", "safetensors", "--trust"]) == 0
    text = capsys.readouterr().out
    assert "skipped (not tensors, not JSON): obj" in text
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    assert index["metadata"]["dcplan_skipped"] == ["obj"]
    assert main(["convert", path, out, "--to", "safetensors"]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["convert", path, str(tmp_path / "x"), "--to", "safetensors", "--max-shard-size", "lots"]) == 2
    assert "--max-shard-size 'lots' is not a size" in capsys.readouterr().err
