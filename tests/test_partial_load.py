"""dcplan-partial-load and strict loading: real dcp.save/dcp.load on gloo processes, plus fast unit tests."""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.distributed.checkpoint as dcp

sys.path.insert(0, os.path.dirname(__file__))

import _load_fns as fns  # noqa: E402

import dcplan  # noqa: E402
from dcplan.load.planner import Mismatch  # noqa: E402
from dcplan.load.report import LoadReport
from dcplan.testing.pytest_plugin import gloo_pool_fixture  # noqa: E402

WORLD = 3


pool = gloo_pool_fixture(WORLD)


@pytest.fixture(scope="module")
def checkpoints(pool, tmp_path_factory):
    """The same training state written by torch's DefaultSavePlanner and by dcplan.SavePlanner."""
    out = {}
    for writer in ("torch", "dcplan"):
        path = str(tmp_path_factory.mktemp(f"partial-{writer}"))
        pool.run(fns.save_train_state, path, writer)
        out[writer] = path
    return out


# ---------------------------------------------------------------- real processes
@pytest.mark.multiproc
def test_strict_load_lists_every_missing_key_on_every_rank(pool, checkpoints):
    messages = pool.run(fns.strict_missing, checkpoints["torch"])
    for rank, msg in enumerate(messages):
        assert msg, f"rank {rank} loaded without error"
        assert "MissingKeysError" in msg or "missing from the checkpoint" in msg
        # every missing key, flattened and nested, in one error
        assert "model.extra.weight" in msg
        assert "optim.state.0.extra_buf" in msg
        assert "optim['state'][0]['extra_buf']" in msg
        assert f"only_on_rank{rank}" in msg
        assert "pip install dcplan-partial-load" in msg


@pytest.mark.multiproc
@pytest.mark.parametrize("writer", ["torch", "dcplan"])
def test_partial_load_skips_missing_and_reports(pool, checkpoints, writer):
    results = pool.run(fns.partial_load, checkpoints[writer])
    for rank, res in enumerate(results):
        assert res["model_ok"] and res["emb_ok"] and res["optim_ok"], (rank, res)
        assert res["untouched"], "keys the checkpoint lacks must be left as they were"
        assert res["meta"]["epoch"] == 7 and res["meta"]["lrs"] == [0.1, 0.01]
        assert res["meta"]["flags"] == (True, None)
    coord = [r for r in results if r["coordinator"]]
    assert len(coord) == 1
    report = coord[0]["report"]
    assert report["ranks"] == WORLD
    missing = {m["key"]: m["nested"] for m in report["missing"]}
    assert missing == {
        "model.head.weight": "model['head.weight']",
        "optim.state.0.extra_buf": "optim['state'][0]['extra_buf']",
    }
    # model.2.bias is requested by no rank; meta.name is requested by ranks 1 and 2
    assert [u["key"] for u in report["unexpected"]] == ["model.2.bias"]
    assert report["unexpected"][0]["nested"] == "model['2.bias']"
    assert report["mismatched"] == []
    assert sorted(report["skipped"]) == sorted(missing)
    local = results[1]["report"]
    assert local["ranks"] == 1 or not results[1]["coordinator"]


@pytest.mark.multiproc
def test_shape_mismatch_is_an_error_by_default(pool, checkpoints):
    results = pool.run(fns.mismatch_load, checkpoints["torch"], None)
    for res in results:
        assert res["error"], "a shape mismatch must fail the load"
        assert "model.0.weight" in res["error"] and "skip_mismatch_keys" in res["error"]
        assert res["untouched"]


@pytest.mark.multiproc
def test_skip_mismatch_keys_skips_listed_keys_and_reports_dtype(pool, checkpoints):
    results = pool.run(fns.mismatch_load, checkpoints["torch"], ["model.0.w*"])
    for res in results:
        assert res["error"] is None, res["error"]
        assert res["untouched"], "the mismatched key must be skipped"
        assert res["bias_cast"] and res["bias_dtype"] == "torch.float64"
    rep = results[0]["report"]
    by_key = {m["key"]: m for m in rep["mismatched"]}
    assert by_key["model.0.weight"]["checkpoint_shape"] == (6, 4)
    assert by_key["model.0.weight"]["state_dict_shape"] == (6, 5)
    assert by_key["model.0.bias"]["checkpoint_dtype"] == "float32"
    assert by_key["model.0.bias"]["state_dict_dtype"] == "float64"
    assert rep["skipped"] == ["model.0.weight"]


# ---------------------------------------------------------------- one process
def _save_small(path: str) -> dict:
    sd = {"model": {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2)},
          "optim": {"state": {0: {"m": torch.zeros(3)}}, "param_groups": [{"lr": 0.1, "params": [0]}]}}
    dcp.save(sd, storage_writer=dcp.FileSystemWriter(path), planner=dcplan.compat.torch_default_save_planner())
    return sd


@pytest.fixture()
def small_ckpt(tmp_path):
    path = str(tmp_path / "ck")
    _save_small(path)
    return path


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_strict_single_process_error_lists_nested_spelling(small_ckpt):
    sd = {"model": {"w": torch.zeros(2, 3), "b": torch.zeros(2), "gone": torch.zeros(1)},
          "optim": {"state": {0: {"m": torch.zeros(3), "v": torch.zeros(3)}}}}
    with pytest.raises(BaseException) as info:
        dcp.load(sd, storage_reader=dcplan.FileSystemReader(small_ckpt), planner=dcplan.LoadPlanner())
    msg = str(info.value)
    assert "2 key(s)" in msg and "model.gone" in msg and "optim['state'][0]['v']" in msg
    assert torch.equal(sd["model"]["w"], torch.zeros(2, 3)), "nothing may be read before the error"


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
@pytest.mark.parametrize("how", ["kwarg", "torch_kwarg", "env", "toml"])
def test_partial_load_is_enabled_by_every_config_source(small_ckpt, how, monkeypatch, tmp_path):
    kwargs: dict = {}
    if how == "kwarg":
        kwargs = {"partial_load": True}
    elif how == "torch_kwarg":
        kwargs = {"allow_partial_load": True}
    elif how == "env":
        monkeypatch.setenv("DCPLAN_PARTIAL_LOAD", "1")
    else:
        (tmp_path / "dcplan.toml").write_text("partial_load = true\n")
    sd = {"model": {"w": torch.zeros(2, 3), "new": torch.full((2,), 3.0)}}
    planner = dcplan.LoadPlanner(**kwargs)
    dcp.load(sd, storage_reader=dcplan.FileSystemReader(small_ckpt), planner=planner)
    assert torch.equal(sd["model"]["w"], torch.arange(6.0).reshape(2, 3))
    assert torch.equal(sd["model"]["new"], torch.full((2,), 3.0))
    assert planner.report.missing_keys == ["model.new"]
    assert "model.b" in planner.report.unexpected_keys


@pytest.mark.parametrize("setting", [{"partial_load": True}, {"skip_mismatch_keys": ["model.*"]}])
def test_partial_load_config_without_the_plugin_is_a_clear_error(monkeypatch, setting):
    monkeypatch.setenv("DCPLAN_DISABLE_PLUGINS", "partial_load")
    with pytest.raises(dcplan.ConfigError, match="pip install dcplan-partial-load"):
        dcplan.LoadPlanner(**setting)
    monkeypatch.setenv("DCPLAN_DISABLE_PLUGINS", "dcplan-partial-load")
    monkeypatch.setenv("DCPLAN_PARTIAL_LOAD", "true")
    with pytest.raises(dcplan.ConfigError, match="environment"):
        dcplan.LoadPlanner()


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_plugin_disabled_means_strict(small_ckpt, monkeypatch):
    monkeypatch.setenv("DCPLAN_DISABLE_PLUGINS", "partial_load")
    sd = {"model": {"w": torch.zeros(2, 3), "new": torch.zeros(1)}}
    with pytest.raises(BaseException, match="model.new"):
        dcp.load(sd, storage_reader=dcplan.FileSystemReader(small_ckpt), planner=dcplan.LoadPlanner())


def test_report_merge_unions_missing_and_intersects_unexpected():
    m = Mismatch("a", "a", (2,), (3,), "float32", "float32")
    r0 = LoadReport(missing=(("x", "x"),), unexpected=(("u", "u"), ("v", "v")), mismatched=(m,), skipped=("x",))
    r1 = LoadReport(missing=(("y", "d['y']"),), unexpected=(("v", "v"),), skipped=("y",))
    merged = LoadReport.merge([r0, r1])
    assert merged.missing_keys == ["x", "y"]
    assert merged.unexpected_keys == ["v"]
    assert merged.mismatched_keys == ["a"]
    assert merged.skipped == ("x", "y") and merged.ranks == 2
    text = merged.format()
    assert "y (d['y'])" in text and "shape (2,) in the checkpoint vs (3,) requested" in text
    assert LoadReport.merge([]).ranks == 0


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_report_is_logged_once_by_the_coordinator(small_ckpt, caplog):
    sd = {"model": {"w": torch.zeros(2, 3), "new": torch.zeros(1)}}
    with caplog.at_level("DEBUG", logger="dcplan"):
        dcp.load(sd, storage_reader=dcplan.FileSystemReader(small_ckpt), planner=dcplan.LoadPlanner(partial_load=True))
    records = [r for r in caplog.records if "dcplan load report" in r.getMessage()]
    assert len(records) == 1 and records[0].levelname == "WARNING"
    assert "model.new" in records[0].getMessage() and "model.b" in records[0].getMessage()
    caplog.clear()
    with caplog.at_level("DEBUG", logger="dcplan"):
        dcp.load({"model": {"w": torch.zeros(2, 3), "b": torch.zeros(2)}, "optim": {
            "state": {0: {"m": torch.zeros(3)}}, "param_groups": [{"lr": None, "params": None}]}},
            storage_reader=dcplan.FileSystemReader(small_ckpt), planner=dcplan.LoadPlanner(report=False))
    assert not [r for r in caplog.records if "dcplan load report" in r.getMessage()]
