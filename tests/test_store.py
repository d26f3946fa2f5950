"""The persistent plan store's file format (no processes): exact, pickle-free, never stale."""

from __future__ import annotations

import os

import pytest
import torch

from dcplan import compat, workloads
from dcplan.save import store, wire
from dcplan.save.metadata import build_global_plan


def _planned(spec="hsdp8", model="tiny", world=16):
    plans = workloads.make(spec, model, world).plans
    plans = [compat.replace_plan(p, planner_data={"m": ("m",), "o.1": ("o", 1)}) for p in plans]
    deduped = compat.torch_dedup_save_plans(plans)
    final, md, errors = build_global_plan(deduped)
    assert not errors
    finals = wire.pack_final([compat.replace_plan(p, planner_data=None) for p in final], plans)
    return plans, finals, md


def test_metadata_and_final_plans_round_trip(tmp_path):
    plans, finals, md = _planned()
    st = store.PlanStore(path=str(tmp_path), slot="s")
    digests = [bytes([r]) * 32 for r in range(len(plans))]
    st.record(digests, finals, md)
    assert st.check(digests)
    got_finals, got_md = st.replay()
    assert got_md.state_dict_metadata == md.state_dict_metadata
    assert got_md.planner_data == md.planner_data
    for r, (a, b) in enumerate(zip(got_finals, finals)):
        assert wire.unpack_final(a, plans[r].items).items == wire.unpack_final(b, plans[r].items).items


def test_any_difference_is_a_miss(tmp_path, caplog):
    plans, finals, md = _planned()
    st = store.PlanStore(path=str(tmp_path), slot="s")
    digests = [bytes([r]) * 32 for r in range(len(plans))]
    st.record(digests, finals, md)
    caplog.set_level("INFO", logger="dcplan")
    changed = list(digests)
    changed[3] = b"x" * 32
    assert not st.check(changed) and "rank(s) [3]" in caplog.text
    assert not store.PlanStore(path=str(tmp_path), slot="other").check(digests)
    assert not st.check(digests[:-1])  # another world size: another file
    (name,) = [os.path.join(tmp_path, f) for f in os.listdir(tmp_path)]
    with open(name, "r+b") as f:
        f.seek(10)
        f.write(b"\x00" * 16)
    assert not st.check(digests) and "corrupt" in caplog.text


@pytest.mark.parametrize("bad", ["dtype", "class"])
def test_decoding_rebuilds_only_known_types(bad):
    with pytest.raises(ValueError):
        if bad == "dtype":
            store._dec_value({"dtype": "os.system"})
        else:
            store._dec_value({"builtins": "eval"})
    assert store._dec_value({"dtype": "bfloat16"}) is torch.bfloat16


_RAN: list[str] = []


def _marker(*args):  # what a crafted blob would call
    _RAN.append("ran")
    return []


def test_a_crafted_pickled_blob_in_the_store_runs_nothing(tmp_path, caplog):
    # Small final plans travel as pickled columns (b"p" blobs, wire.py). The store file is
    # read without unpickling objects: a blob naming a global is refused as corrupt.
    import base64
    import json
    import pickle
    import zlib

    plans, finals, md = _planned()
    st = store.PlanStore(path=str(tmp_path), slot="s")
    digests = [bytes([r]) * 32 for r in range(len(plans))]
    st.record(digests, finals, md)
    (name,) = [os.path.join(tmp_path, f) for f in os.listdir(tmp_path)]
    with open(name, "rb") as f:
        doc = json.loads(zlib.decompress(f.read()))
    evil = b"p" + pickle.dumps((_Evil(), [], []), protocol=3)
    assert b"_marker" in evil or b"test_store" in evil  # it does name a global
    doc["finals"][0]["blob"] = base64.b64encode(evil).decode()
    with open(name, "wb") as f:
        f.write(zlib.compress(json.dumps(doc).encode()))
    caplog.set_level("INFO", logger="dcplan")
    assert not st.check(digests)
    assert "corrupt" in caplog.text and "may not name" in caplog.text
    assert _RAN == []


class _Evil:
    def __reduce__(self):
        return (_marker, ())


@pytest.mark.parametrize("n", [0, 1, 3, 200])
def test_small_and_large_column_blobs_round_trip(n):
    cols = [list(range(n)), [2**40 + i for i in range(n)], b"a\x00b" * n, [-1] * min(n, 2), [7]]
    blob = wire._pack(cols)
    assert blob[:1] == (b"p" if sum(map(len, cols)) <= wire._SMALL else b"z")
    assert wire.check_blob(blob) is blob
    got = wire._unpack(blob, len(cols))
    assert [bytes(c) if isinstance(c, bytes) else list(c) for c in got] == cols
