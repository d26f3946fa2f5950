"""dcplan.compat on whatever torch this environment has (tox runs it on 2.4 ... 2.15).

Each feature flag is checked against what torch actually does, so a flag that lies
on some version fails there. Milliseconds; no processes.
"""

from __future__ import annotations

import inspect
import io
import pickle

import pytest
import torch

import dcplan
from dcplan import compat
from dcplan.load.safe import MetadataVersionError, read_metadata_file
from dcplan.testing.plans import bytes_item, plan, tensor_item


def _accepts(fn, **kwargs) -> bool:
    try:
        fn(**kwargs)
    except TypeError:
        return False
    return True


# ---------------------------------------------------------------- feature flags match torch
def test_usable_flag_matches_saveplan() -> None:
    assert compat.HAS_USABLE == _accepts(compat.SavePlan, items=[], usable=False)


def test_bytes_io_data_flag_matches_writeitem() -> None:
    from torch.distributed.checkpoint import planner

    assert compat.HAS_BYTES_IO_DATA == hasattr(planner, "BytesIOWriteData")


def test_metadata_flags_match_metadata() -> None:
    assert compat.HAS_STORAGE_META == _accepts(compat.Metadata, state_dict_metadata={}, storage_meta=None)
    assert compat.HAS_METADATA_VERSION == _accepts(compat.Metadata, state_dict_metadata={}, version="1.0.0")
    md = compat.Metadata(state_dict_metadata={})
    assert compat.metadata_version(md) == (md.version if compat.HAS_METADATA_VERSION else None)
    assert compat.metadata_storage_meta(md) is None


def test_strides_flag_matches_tensor_properties_state() -> None:
    state = compat.TensorProperties().__getstate__()
    assert len(state) == compat.TENSOR_PROPERTIES_FIELDS
    assert compat.HAS_STRIDES == (len(state) > 5)


def test_derived_version_flag_matches_module() -> None:
    try:
        from torch.distributed.checkpoint import _version
    except ImportError:
        assert not compat.HAS_DERIVED_VERSION
        return
    assert compat.HAS_DERIVED_VERSION == hasattr(_version, "_derived_version")


def test_dtensor_is_torchs_dtensor() -> None:
    Replicate, Shard = compat.dtensor_placements()
    assert Shard(0) != Shard(1) and Replicate() == Replicate()
    assert compat.DTensor.__name__ == "DTensor"


# ---------------------------------------------------------------- plans and items
def test_make_write_item_always_puts_tensor_data_in_tensor_data() -> None:
    """2.8 inserted bytes_io_data before tensor_data: positional construction breaks there."""
    item = tensor_item("w", (4, 4))
    assert item.tensor_data is not None and tuple(item.tensor_data.size) == (4, 4)
    b = bytes_item("obj", nbytes=123)
    assert b.tensor_data is None
    assert compat.bytes_item_size(b) == (123 if compat.HAS_BYTES_IO_DATA else None)
    assert compat.bytes_item_size(compat.with_bytes_size(b, 7)) == (7 if compat.HAS_BYTES_IO_DATA else None)


def test_replace_plan_drops_fields_this_torch_lacks() -> None:
    p = plan([tensor_item("w", (2,))])
    q = compat.replace_plan(p, usable=False, planner_data={"k": 1})
    assert q.planner_data == {"k": 1}
    assert compat.plan_usable(q) is (not compat.HAS_USABLE)
    assert compat.plan_usable(p) is True
    lp = compat.replace_plan(compat.LoadPlan([]), planner_data="x")
    assert isinstance(lp, compat.LoadPlan) and lp.planner_data == "x"


def test_torch_dedup_never_mutates_its_input() -> None:
    """torch 2.3-2.7 assign the deduplicated plans into the list they are given."""
    plans = [plan([tensor_item("a", (8,)), tensor_item("b", (8,))]) for _ in range(3)]
    before = [list(p.items) for p in plans]
    out = compat.torch_dedup_save_plans(plans)
    assert [list(p.items) for p in plans] == before
    assert sorted(i.index.fqn for p in out for i in p.items) == ["a", "b"]
    lowest = compat.torch_dedup_save_plans(plans, save_to_lowest_rank=True)
    assert [i.index.fqn for i in lowest[0].items] == ["a", "b"] and not lowest[1].items


def _two_shards(second_offset: int) -> list:
    return [
        plan([tensor_item("w", (8, 4), (0, 0), (4, 4))]),
        plan([tensor_item("w", (8, 4), (second_offset, 0), (4, 4))]),
    ]


def test_torch_validate_global_plan_is_a_list_on_every_version() -> None:
    """<= 2.11 return True for valid (truthy!), 2.12+ a list of errors (empty = valid)."""
    from torch.distributed.checkpoint.default_planner import create_default_global_save_plan

    gp, md = create_default_global_save_plan(_two_shards(4))
    assert compat.torch_validate_global_plan(gp, md) == []
    bad_gp, bad_md = create_default_global_save_plan(_two_shards(2))  # rows 2-3 written twice, 6-7 never
    errors = compat.torch_validate_global_plan(bad_gp, bad_md)
    assert isinstance(errors, list) and errors and all(isinstance(e, str) for e in errors)


def test_torch_planner_factories_drop_unknown_keywords() -> None:
    """enable_plan_caching is 2.7+, dedup_save_to_lowest_rank and allow_partial_load 2.4+."""
    sp = compat.torch_default_save_planner(enable_plan_caching=True, dedup_save_to_lowest_rank=True)
    assert isinstance(sp, compat.DefaultSavePlanner)
    params = inspect.signature(compat.DefaultSavePlanner.__init__).parameters
    assert getattr(sp, "_enable_plan_caching", False) == ("enable_plan_caching" in params)
    lp = compat.torch_default_load_planner(allow_partial_load=True)
    assert isinstance(lp, compat.DefaultLoadPlanner)


def test_set_up_planner_accepts_both_arities() -> None:
    """2.2/2.3 savers call set_up_planner(sd, is_coordinator); 2.4+ (sd, storage_meta, is_coordinator)."""
    p = dcplan.SavePlanner(report=False)
    p.set_up_planner({"a": torch.zeros(2)}, True)
    assert p.is_coordinator is True and p.storage_meta is None
    p.set_up_planner({"a": torch.zeros(2)}, None, False)
    assert p.is_coordinator is False


def test_old_format_flatten_is_none_only_without_the_fallback() -> None:
    sd = {"a": [1, 2], "b": {"c": torch.zeros(1)}}
    out = compat.old_format_flatten(sd)
    assert (out is None) == (not compat.HAS_DERIVED_VERSION)
    if out is not None:
        assert "b.c" in out[0]


def test_init_state_dict_leaves_real_tensors_alone() -> None:
    """(Meta tensors need a process group: covered by the multi-process load tests.)"""
    t = torch.ones(3)
    sd = {"w": t, "n": 1}
    compat.init_state_dict(sd)
    assert sd["w"] is t and sd["n"] == 1


def test_weights_only_load_with_extra_globals() -> None:
    buf = io.BytesIO()
    torch.save({"t": torch.ones(2), "n": 3}, buf)
    buf.seek(0)
    out = compat.weights_only_load(buf)
    assert out["n"] == 3 and torch.equal(out["t"], torch.ones(2))


# ---------------------------------------------------------------- 2.15 metadata on older torch
def _tp_state_with_strides() -> tuple:
    return (*compat.TensorProperties().__getstate__()[:5], (4, 1))


@pytest.mark.skipif(compat.HAS_STRIDES, reason="torch >= 2.15 reads TensorProperties with strides")
def test_strides_state_raises_a_clear_dcplan_error_before_2_15() -> None:
    tp = compat.TensorProperties.__new__(compat.TensorProperties)
    with pytest.raises(MetadataVersionError) as info:
        tp.__setstate__(_tp_state_with_strides())
    msg = str(info.value)
    assert torch.__version__ in msg and ">= 2.15" in msg and "<= 2.14" in msg
    assert isinstance(info.value, ValueError)  # callers catching torch's ValueError still do
    assert compat.METADATA_FORMAT_GUARD and compat.install_metadata_format_guard()  # idempotent


def test_five_field_state_still_reads_on_every_version() -> None:
    tp = compat.TensorProperties.__new__(compat.TensorProperties)
    tp.__setstate__(compat.TensorProperties(dtype=torch.bfloat16).__getstate__()[:5])
    assert tp.dtype == torch.bfloat16 and tp.memory_format == torch.contiguous_format


def _metadata_pickle_with_strides() -> bytes:
    """A ``.metadata`` byte stream whose TensorProperties has a sixth field, as torch 2.15 writes it."""
    tp = compat.TensorProperties(dtype=torch.float32)
    tp.__getstate__ = _tp_state_with_strides  # type: ignore[method-assign]  # this instance only
    md = compat.Metadata(
        state_dict_metadata={
            "w": compat.TensorStorageMetadata(
                properties=tp,
                size=torch.Size([4]),
                chunks=[compat.ChunkStorageMetadata(offsets=torch.Size([0]), sizes=torch.Size([4]))],
            )
        }
    )
    return pickle.dumps(md)


@pytest.mark.skipif(compat.HAS_STRIDES, reason="torch >= 2.15 reads TensorProperties with strides")
@pytest.mark.parametrize("reader", ["pickle", "dcplan-safe"])
def test_strides_metadata_refused_by_every_reader_before_2_15(reader: str) -> None:
    data = _metadata_pickle_with_strides()
    with pytest.raises(MetadataVersionError, match="torch >= 2.15"):
        if reader == "pickle":  # what torch's own FileSystemReader does
            pickle.loads(data)
        else:
            read_metadata_file(io.BytesIO(data))


@pytest.mark.skipif(not compat.HAS_STRIDES, reason="torch <= 2.14 cannot read strides (see the test above)")
def test_strides_metadata_reads_from_2_15() -> None:
    md = read_metadata_file(io.BytesIO(pickle.dumps(compat.Metadata(state_dict_metadata={}))))
    assert isinstance(md, compat.Metadata)
    assert not compat.METADATA_FORMAT_GUARD


def test_with_index_hint_keeps_every_field_on_both_paths(monkeypatch) -> None:
    from dcplan.save.metadata import build_global_plan

    items = [tensor_item("w", (8, 4), (4, 0), (4, 4), shard=True), bytes_item("o", nbytes=5)]
    for fast in (True, False):
        if not fast:
            monkeypatch.setattr(compat, "ITEMS_COPY_BY_DICT", False)
        for item in items:
            new = compat.with_index_hint(item, 3)
            assert new.index.index == 3 and item.index.index != 3  # the input is untouched
            assert new.index == item.index  # fqn and offset (equality ignores the hint)
            for f in compat._fields(type(item)) - {"index"}:
                assert getattr(new, f) == getattr(item, f)
        gp, md, errors = build_global_plan([plan([items[0]]), plan([items[1]])])
        assert not errors and gp[0].items[0].index.index == 0 and gp[0].items[0].tensor_data == items[0].tensor_data
    monkeypatch.undo()
    # the flag tells the truth about this torch
    idx = compat.MetadataIndex("x", (0,), 1)
    assert compat.ITEMS_COPY_BY_DICT == ("fqn" in getattr(idx, "__dict__", {}))
