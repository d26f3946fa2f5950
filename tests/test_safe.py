"""Safe loading: crafted checkpoints run nothing; ordinary training state still loads with the defaults."""

from __future__ import annotations

import collections
import os
import pathlib
import pickle
import random
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp

sys.path.insert(0, os.path.dirname(__file__))

from _load_fns import Box  # noqa: E402

import dcplan  # noqa: E402
from dcplan import compat  # noqa: E402
from dcplan.cli.main import main as cli_main  # noqa: E402
from dcplan.load.safe import metadata_allow_list, read_metadata_file  # noqa: E402
from dcplan.manager import DcplanPluginManager, hookimpl  # noqa: E402


def _loader_source() -> str:
    import inspect

    from torch.distributed.checkpoint import state_dict_loader

    return inspect.getsource(state_dict_loader)

from dcplan_empty_load import load_checkpoint  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

#: torch 2.9-2.12's dcp.load catches any read_metadata error, falls back to rank-local metadata and
#: raises "metadata is None" without the cause (2.13 appends the causes; 2.4-2.8 propagate them).
TORCH_SWALLOWS_METADATA_ERRORS = "global metadata read failed" not in _loader_source() and (
    "Falling back to rank local metadata" in _loader_source())


class Evil:
    """Unpickling this runs a shell command that creates ``sentinel``."""

    def __init__(self, sentinel: str) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


def _save(sd: dict, path: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(sd, storage_writer=dcp.FileSystemWriter(path), planner=compat.torch_default_save_planner())


def _load(sd: dict, path: str, **cfg) -> dcplan.LoadPlanner:
    planner = dcplan.LoadPlanner(**cfg)
    dcp.load(sd, storage_reader=dcplan.FileSystemReader(path, **cfg), planner=planner)
    return planner


@pytest.fixture()
def sentinel(tmp_path):
    path = str(tmp_path / "PWNED")
    yield path
    assert not os.path.exists(path), "a crafted checkpoint ran code"


@pytest.fixture()
def evil_item_ckpt(tmp_path, sentinel):
    path = str(tmp_path / "evil-item")
    _save({"w": torch.ones(2), "payload": Evil(sentinel)}, path)
    return path


@pytest.fixture()
def evil_metadata_ckpt(tmp_path, sentinel):
    path = tmp_path / "evil-meta"
    path.mkdir()
    (path / ".metadata").write_bytes(pickle.dumps(Evil(sentinel)))
    return str(path)


# ---------------------------------------------------------------- malicious payloads
def test_payload_in_a_bytes_item_runs_nothing(evil_item_ckpt, sentinel):
    sd = {"w": torch.zeros(2), "payload": None}
    with pytest.raises(BaseException) as info:
        _load(sd, evil_item_ckpt)
    msg = str(info.value)
    assert "non-tensor item 'payload'" in msg
    assert f"{os.system.__module__}.system" in msg
    assert "trusted_globals" in msg and "DANGEROUS" in msg


def test_payload_in_a_bytes_item_runs_nothing_with_the_empty_loader(evil_item_ckpt, sentinel):
    with pytest.raises(dcplan.UnsafeCheckpointError) as info:
        load_checkpoint(evil_item_ckpt)
    assert info.value.key == "payload" and info.value.blocked == [f"{os.system.__module__}.system"]
    assert torch.equal(load_checkpoint(evil_item_ckpt, keys=["w"])["w"], torch.ones(2))


def test_payload_in_metadata_runs_nothing(evil_metadata_ckpt, sentinel):
    with pytest.raises(dcplan.UnsafeCheckpointError, match=r"\.metadata.*system"):
        dcplan.FileSystemReader(evil_metadata_ckpt).read_metadata()
    with pytest.raises(BaseException) as info:
        dcp.load({"w": torch.zeros(2)}, storage_reader=dcplan.FileSystemReader(evil_metadata_ckpt),
                 planner=dcplan.LoadPlanner())
    if not TORCH_SWALLOWS_METADATA_ERRORS:
        assert "refusing to unpickle" in str(info.value)
    with pytest.raises(dcplan.UnsafeCheckpointError):
        load_checkpoint(evil_metadata_ckpt)


@pytest.mark.parametrize("where,argv", [
    ("metadata", ["inspect", "{ck}"]),
    ("metadata", ["inspect", "{ck}", "--json"]),
    ("metadata", ["convert", "{ck}", "{out}"]),
    ("item", ["convert", "{ck}", "{out}"]),  # inspect never unpickles items
])
def test_cli_refuses_crafted_checkpoints_in_one_line(argv, where, evil_metadata_ckpt, evil_item_ckpt, tmp_path,
                                                     capsys, sentinel):
    ck = evil_metadata_ckpt if where == "metadata" else evil_item_ckpt
    args = [a.format(ck=ck, out=str(tmp_path / "out.pt")) for a in argv]
    assert cli_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dcplan: error: refusing to unpickle") and "\n" not in err
    assert "Traceback" not in err and "--trust" in err
    assert not os.path.exists(tmp_path / "out.pt")


def test_convert_to_dcp_refuses_a_crafted_pt(tmp_path, capsys, sentinel):
    src = tmp_path / "evil.pt"
    torch.save({"x": Evil(sentinel)}, src)
    assert cli_main(["convert", "--to-dcp", str(src), str(tmp_path / "ck")]) == 2
    err = capsys.readouterr().err.strip()
    assert "refusing to unpickle" in err and "\n" not in err
    assert not os.path.exists(tmp_path / "ck" / ".metadata")


# ---------------------------------------------------------------- allowing types
@pytest.fixture()
def box_ckpt(tmp_path):
    path = str(tmp_path / "box")
    _save({"box": Box(3)}, path)
    return path


def test_blocked_user_type_names_key_global_and_fix(box_ckpt):
    with pytest.raises(BaseException) as info:
        _load({"box": None}, box_ckpt)
    msg = str(info.value)
    assert "'box'" in msg and "_load_fns.Box" in msg and 'trusted_globals = ["_load_fns.Box"]' in msg


def test_trusted_globals_and_trust_checkpoint_allow_it(box_ckpt, tmp_path):
    sd = {"box": None}
    _load(sd, box_ckpt, trusted_globals=["_load_fns.Box"])
    assert sd["box"] == Box(3)
    sd = {"box": None}
    (tmp_path / "dcplan.toml").write_text('trusted_globals = ["_load_fns.Box"]\n')
    _load(sd, box_ckpt)
    assert sd["box"] == Box(3)
    os.unlink(tmp_path / "dcplan.toml")
    sd = {"box": None}
    _load(sd, box_ckpt, trust_checkpoint=True)
    assert sd["box"] == Box(3)


def test_unimportable_trusted_global_is_a_config_error_before_loading():
    with pytest.raises(dcplan.ConfigError, match="'nowhere.Nothing'.*cannot be imported"):
        dcplan.LoadPlanner(trusted_globals=["nowhere.Nothing"])
    with pytest.raises(dcplan.ConfigError, match="cannot be imported"):
        dcplan.FileSystemReader("/anywhere", trusted_globals=["nowhere.Nothing"])


class _BoxPlugin:
    @hookimpl
    def dcplan_safe_globals(self):
        return [Box]


def test_plugins_contribute_safe_globals(box_ckpt, tmp_path):
    pm = DcplanPluginManager(extra_plugins=[("box_types", _BoxPlugin())])
    sd = {"box": None}
    planner = dcplan.LoadPlanner(plugin_manager=pm)
    dcp.load(sd, storage_reader=dcplan.FileSystemReader(box_ckpt, plugin_manager=pm), planner=planner)
    assert sd["box"] == Box(3)
    # the .metadata reader honours the same list
    meta = os.path.join(box_ckpt, ".metadata")
    with open(meta, "rb") as fh:
        md = pickle.load(fh)
    md.planner_data["extra"] = Box(1)
    with open(meta, "wb") as fh:
        pickle.dump(md, fh)
    with pytest.raises(dcplan.UnsafeCheckpointError, match="_load_fns.Box"):
        dcplan.FileSystemReader(box_ckpt).read_metadata()
    assert dcplan.FileSystemReader(box_ckpt, plugin_manager=pm).read_metadata().planner_data["extra"] == Box(1)
    assert dcplan.FileSystemReader(box_ckpt, trusted_globals=["_load_fns.Box"]).read_metadata()


# ---------------------------------------------------------------- ordinary state loads with the defaults
def _training_state() -> dict:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.8, 0.9), amsgrad=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    sched.step()
    return {
        "model": model.state_dict(),
        "optim": opt.state_dict(),
        "sched": sched.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()},
        "plain": {"i": 3, "f": 0.25, "s": "text", "l": [1, "a", None], "d": {"k": (1, 2.0)}, "b": True,
                  "set": {3, 1}, "fs": frozenset({"a"}), "c": 1 - 2j, "ba": bytearray(b"xy"), "by": b"\x00z",
                  "path": pathlib.Path("/data/run-1"), "od": collections.OrderedDict(z=1, a=2)},
        "np": {"arr": np.arange(6, dtype=np.int16).reshape(2, 3), "f64": np.float64(1.5), "i32": np.int32(-4)},
    }


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, np.generic):
        return type(a) is type(b) and a == b
    if isinstance(a, dict):
        return set(map(str, a)) == set(map(str, b)) and all(
            _same(v, b[k] if k in b else b[str(k)]) for k, v in a.items())
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _blank(obj):
    """Same structure as DCP flattens it, every leaf emptied (tensors zeroed, objects None)."""
    if isinstance(obj, torch.Tensor):
        return torch.zeros_like(obj)
    if isinstance(obj, dict):
        return {k: _blank(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and any(isinstance(v, (torch.Tensor, dict)) for v in obj):
        return type(obj)(_blank(v) for v in obj)
    return None


def test_ordinary_training_state_round_trips_with_the_defaults(tmp_path):
    path = str(tmp_path / "train")
    ref = _training_state()
    _save(ref, path)
    target = _blank(_training_state())
    assert not _same(ref, target)
    _load(target, path)
    assert _same(ref, target)
    assert _same(ref, load_checkpoint(path))


def test_torch_default_save_planner_checkpoint_loads(tmp_path):
    path = str(tmp_path / "ck")
    m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2))
    _save({"m": m.state_dict(), "epoch": 4}, path)
    got = load_checkpoint(path)
    assert _same({"m": m.state_dict(), "epoch": 4}, got)


# ---------------------------------------------------------------- metadata reader
def test_allow_list_covers_dcp_metadata_types():
    names = metadata_allow_list()
    for cls in (compat.Metadata, compat.TensorProperties, compat.MetadataIndex, compat.ChunkStorageMetadata):
        assert f"{cls.__module__}.{cls.__name__}" in names
    assert "builtins.eval" not in names and "os.system" not in names


@pytest.mark.parametrize("content,match", [
    (b"", "truncated or corrupted"),
    (b"not a pickle at all", "truncated or corrupted|corrupted or not DCP metadata"),
    (pickle.dumps({"a": 1}), "does not hold DCP metadata"),
])
def test_bad_metadata_gives_a_clear_error(tmp_path, content, match):
    (tmp_path / ".metadata").write_bytes(content)
    with pytest.raises(dcplan.CheckpointReadError, match=match):
        dcplan.FileSystemReader(str(tmp_path)).read_metadata()


def test_truncated_real_metadata(tmp_path):
    path = str(tmp_path / "ck")
    _save({"w": torch.ones(3)}, path)
    meta = os.path.join(path, ".metadata")
    data = open(meta, "rb").read()
    open(meta, "wb").write(data[: len(data) // 2])
    with pytest.raises(dcplan.CheckpointReadError, match="truncated"):
        dcplan.FileSystemReader(path).read_metadata()


def _metadata_with_strides(path: str) -> bytes:
    """A .metadata as torch 2.15 writes it: TensorProperties pickled with a 6th field (strides)."""
    _save({"w": torch.ones(2, 3)}, path)
    with open(os.path.join(path, ".metadata"), "rb") as fh:
        md = pickle.load(fh)
    orig = compat.TensorProperties.__getstate__
    try:
        compat.TensorProperties.__getstate__ = lambda self: tuple(orig(self)) + ((3, 1),)  # type: ignore[method-assign]
        return pickle.dumps(md)
    finally:
        compat.TensorProperties.__getstate__ = orig  # type: ignore[method-assign]


@pytest.mark.skipif(compat.HAS_STRIDES, reason="torch >= 2.15 (TensorProperties.strides) reads 2.15 metadata")
def test_metadata_from_a_newer_torch_names_the_cause(tmp_path, capsys):
    path = str(tmp_path / "ck")
    data = _metadata_with_strides(path)
    with open(os.path.join(path, ".metadata"), "wb") as fh:
        fh.write(data)
    with pytest.raises(dcplan.MetadataVersionError, match="newer torch.*strides.*torch >= 2.15"):
        dcplan.FileSystemReader(path).read_metadata()
    assert cli_main(["inspect", path]) == 2
    assert "newer torch" in capsys.readouterr().err


def test_read_metadata_file_accepts_a_stream(tmp_path):
    path = str(tmp_path / "ck")
    _save({"w": torch.ones(2)}, path)
    with open(os.path.join(path, ".metadata"), "rb") as fh:
        md = read_metadata_file(fh)
    assert list(md.state_dict_metadata) == ["w"]
