"""dcplan-empty-load: rebuild a state dict from a checkpoint, in one process or on one rank of many."""

from __future__ import annotations

import json
import os
import pickle
import sys
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp

sys.path.insert(0, os.path.dirname(__file__))

import _load_fns as fns  # noqa: E402

import dcplan  # noqa: E402
from dcplan import compat  # noqa: E402
from dcplan.cli.main import main as cli_main  # noqa: E402
from dcplan.testing.pytest_plugin import gloo_pool_fixture  # noqa: E402
from dcplan_empty_load import EmptyLoadPlanner, KeySelectionError, load_checkpoint, select_keys  # noqa: E402

WORLD = 2


pool = gloo_pool_fixture(WORLD)


@pytest.fixture(scope="module")
def sharded(pool, tmp_path_factory):
    """DTensor-sharded training state written by torch's DefaultSavePlanner and by dcplan."""
    out = {}
    for writer in ("torch", "dcplan"):
        path = str(tmp_path_factory.mktemp(f"empty-{writer}"))
        pool.run(fns.save_train_state, path, writer)
        out[writer] = path
    out["reference"] = pool.run(fns.full_reference)[0]
    return out


# ---------------------------------------------------------------- real processes
@pytest.mark.multiproc
@pytest.mark.parametrize("writer", ["torch", "dcplan"])
def test_empty_load_on_one_rank_of_many(pool, sharded, writer):
    results = pool.run(fns.empty_load_on_one_rank, sharded[writer])
    assert results[:-1] == [None] * (WORLD - 1)
    assert results[-1] == sharded["reference"]


@pytest.mark.multiproc
def test_empty_load_planner_through_dcp_load_on_every_rank(pool, sharded):
    results = pool.run(fns.empty_load_via_dcp, sharded["torch"])
    assert all(r == sharded["reference"] for r in results)


@pytest.mark.multiproc
def test_empty_load_without_a_process_group_in_this_process(sharded):
    got = fns.digest(load_checkpoint(sharded["torch"]))
    assert got == sharded["reference"]
    sub = load_checkpoint(sharded["torch"], keys=["emb", "optim.state"])
    assert sorted(sub) == ["emb", "optim"] and list(sub["optim"]) == ["state"]
    assert fns.digest(sub["emb"]) == sharded["reference"]["emb"]


@pytest.mark.multiproc
def test_inspect_counts_chunks_of_a_sharded_checkpoint(sharded, capsys):
    assert cli_main(["inspect", sharded["torch"], "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    rows = {r["key"]: r for r in d["keys"]}
    assert rows["emb"]["chunks"] == WORLD and rows["emb"]["shape"] == [WORLD * 3 + 1, 5]
    assert rows["emb"]["bytes"] == (WORLD * 3 + 1) * 5 * 4
    assert d["totals"]["files"] == WORLD


# ---------------------------------------------------------------- one process
def _save(sd: dict, path: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(sd, storage_writer=dcp.FileSystemWriter(path), planner=compat.torch_default_save_planner())


def _state() -> dict:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    return {
        "model": model.state_dict(),
        "optim": opt.state_dict(),
        "layers": [torch.arange(3.0), {"w": torch.ones(2, dtype=torch.bfloat16)}],
        "step": 11,
        "note": {"text": "hello", "ratio": 0.5, "ids": [1, 2, 3]},
    }


@pytest.fixture()
def ckpt(tmp_path):
    path = str(tmp_path / "ck")
    sd = _state()
    _save(sd, path)
    return path, sd


def _rewrite_metadata(path: str, change) -> None:
    meta = os.path.join(path, ".metadata")
    with open(meta, "rb") as fh:
        md = pickle.load(fh)
    change(md)
    with open(meta, "wb") as fh:
        pickle.dump(md, fh)


def test_rebuilds_nested_structure_and_objects(ckpt):
    path, sd = ckpt
    got = load_checkpoint(path)
    assert sorted(got) == sorted(sd)
    assert torch.equal(got["model"]["weight"], sd["model"]["weight"])
    assert got["layers"][1]["w"].dtype == torch.bfloat16 and torch.equal(got["layers"][0], torch.arange(3.0))
    assert got["step"] == 11 and got["note"] == {"text": "hello", "ratio": 0.5, "ids": [1, 2, 3]}
    assert got["optim"]["param_groups"][0]["lr"] == 0.1
    assert torch.equal(got["optim"]["state"]["0"]["momentum_buffer"], sd["optim"]["state"][0]["momentum_buffer"])


def test_keys_select_flattened_keys_and_nested_prefixes(ckpt):
    path, sd = ckpt
    got = load_checkpoint(path, keys=["model", "layers.1.w", "note.text"])
    assert sorted(got) == ["layers", "model", "note"]
    assert sorted(got["model"]) == ["bias", "weight"]
    assert got["layers"][0] is None and got["layers"][1]["w"].dtype == torch.bfloat16  # only w allocated
    assert got["note"] == {"text": "hello"}
    assert load_checkpoint(path, keys="step") == {"step": 11}


def test_unknown_key_names_what_exists(ckpt):
    path, _ = ckpt
    with pytest.raises(KeySelectionError, match="'modle' match nothing.*top-level names: layers, model"):
        load_checkpoint(path, keys=["modle"])


@pytest.mark.parametrize("keys", [None, ["model"], ["note.text"]])
def test_metadata_without_planner_data(ckpt, keys):
    """torch's _EmptyStateDictLoadPlanner crashes here; keys then stay flat."""
    path, sd = ckpt
    _rewrite_metadata(path, lambda md: setattr(md, "planner_data", None))
    got = load_checkpoint(path, keys=keys)
    if keys is None:
        assert torch.equal(got["model.weight"], sd["model"]["weight"]) and got["step"] == 11
    elif keys == ["model"]:
        assert sorted(got) == ["model.bias", "model.weight"]
    else:
        assert got == {"note.text": "hello"}


def test_metadata_whose_planner_data_lacks_a_key(ckpt):
    path, sd = ckpt
    _rewrite_metadata(path, lambda md: md.planner_data.pop("model.bias"))
    got = load_checkpoint(path, keys=["model"])
    assert torch.equal(got["model"]["weight"], sd["model"]["weight"])
    assert torch.equal(got["model.bias"], sd["model"]["bias"])


def test_empty_planner_refuses_a_non_empty_dict(ckpt):
    path, _ = ckpt
    with pytest.raises(BaseException, match="pass \\{\\}"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.load({"x": torch.zeros(1)}, storage_reader=dcplan.FileSystemReader(path), planner=EmptyLoadPlanner())


def test_select_keys_is_sorted_and_deterministic(ckpt):
    path, _ = ckpt
    md = dcplan.FileSystemReader(path).read_metadata()
    sel = select_keys(md, ["note", "model"])
    assert sel == sorted(sel) and sel[0] == "model.bias"
    assert select_keys(md, None) == sorted(md.state_dict_metadata)
