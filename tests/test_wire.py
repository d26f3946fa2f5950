"""The compact plan encoding: any plan round-trips exactly (no processes)."""

from __future__ import annotations

import pickle

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dcplan import compat, workloads
from dcplan.compat import (
    ChunkStorageMetadata,
    MetadataIndex,
    SavePlan,
    TensorProperties,
    TensorWriteData,
    WriteItemType,
)
from dcplan.save import exchange, wire

DTYPES = [torch.float32, torch.bfloat16, torch.int64, torch.uint8, torch.float64]


@st.composite
def write_items(draw):
    fqn = draw(st.sampled_from(["a", "model.w", "optim.state.0.exp_avg", "é.ü", "x" * 70, ""]))
    hint = draw(st.one_of(st.none(), st.integers(0, 2**40)))
    if draw(st.integers(0, 4)) == 0:  # an object item
        nbytes = draw(st.one_of(st.none(), st.integers(0, 2**40)))
        return compat.make_write_item(MetadataIndex(fqn, None, hint), WriteItemType.BYTE_IO, None, nbytes)
    ndim = draw(st.integers(0, 3))
    size = [draw(st.integers(0, 2**33)) for _ in range(ndim)]
    offs = [draw(st.integers(0, s)) if s else 0 for s in size]
    sizes = [draw(st.integers(0, s - o)) for s, o in zip(size, offs)]
    if draw(st.booleans()):  # a whole tensor
        offs, sizes = [0] * ndim, list(size)
    odd = draw(st.integers(0, 9))
    as_size = torch.Size if odd else tuple  # plain tuples must survive too (raw path)
    props = TensorProperties(dtype=draw(st.sampled_from(DTYPES)), requires_grad=draw(st.booleans()))
    td = TensorWriteData(
        chunk=ChunkStorageMetadata(offsets=as_size(offs), sizes=as_size(sizes)), properties=props, size=as_size(size)
    )
    index_offset = offs if odd != 1 else [o + 1 for o in offs]  # an index offset that is not the chunk's
    wtype = WriteItemType.TENSOR if offs == [0] * ndim and sizes == size else WriteItemType.SHARD
    return compat.make_write_item(MetadataIndex(fqn, index_offset, hint), wtype, td)


@settings(max_examples=150, deadline=None)
@given(st.lists(write_items(), max_size=40))
def test_encode_decode_is_exact(items):
    enc = wire.encode_items(items)
    back = wire.decode_items(pickle.loads(pickle.dumps(enc)))
    assert back == items
    for a, b in zip(back, items):
        assert type(a.index.offset) is type(b.index.offset)
        assert compat.bytes_item_size(a) == compat.bytes_item_size(b)
        if b.tensor_data is not None:
            assert a.tensor_data.properties == b.tensor_data.properties
    assert enc.digest() == wire.encode_items(list(items)).digest()


@settings(max_examples=100, deadline=None)
@given(st.lists(write_items(), min_size=1, max_size=30), st.data())
def test_final_plan_roundtrip(items, data):
    """A final plan (subset with hints, plus new items) comes back equal on the rank."""
    keep = data.draw(st.lists(st.sampled_from(range(len(items))), unique=True))
    final = [compat.with_index_hint(items[i], data.draw(st.integers(0, 99))) for i in keep]
    final += data.draw(st.lists(write_items(), max_size=3))  # e.g. a splitting strategy's sub-chunks
    local = SavePlan(list(items))
    packed = wire.pack_final([SavePlan(final, planner_data="pd")], [local])[0]
    packed = pickle.loads(pickle.dumps(packed))
    back = wire.unpack_final(packed, local.items)
    assert back.items == final and back.planner_data == "pd"


def test_compact_size_and_speed_on_real_layouts():
    for spec, model, world in [("fsdp", "70b", 64), ("hsdp8", "7b", 16), ("tp2pp2dp2", "7b", None)]:
        plan = workloads.make(spec, model, world).plans[1]
        enc = wire.encode_items(plan.items)
        per_entry = len(pickle.dumps(enc)) / len(plan.items)
        assert per_entry <= 40, (spec, per_entry)
        assert wire.decode_items(enc) == plan.items


def test_gathered_refs_rebuild_full_view():
    plans = workloads.make("hsdp8", "7b", 16).plans
    from dcplan.save.planner import RankPayload

    sent, digests = [], []
    payload = RankPayload(mapping={"a": ("a",)}, agreement=("a",), digest=b"d")
    for p in plans:
        enc = wire.encode_items(p.items)
        digests.append(enc.digest() + exchange.meta_digest(payload))
        sent.append((p, enc))
    refs, meta_refs = exchange.plan_refs(digests)
    assert refs[:8] == [None] * 8 and refs[8:] == list(range(8))
    assert meta_refs == [None] + [0] * 15
    gathered = [
        wire.pack_local(p, payload, enc, ref, meta_ref=mref)
        for (p, enc), ref, mref in zip(sent, refs, meta_refs)
    ]
    full = wire.unpack_gathered(pickle.loads(pickle.dumps(gathered)), RankPayload)
    assert [f.items for f in full] == [p.items for p in plans]
    assert all(f.planner_data == payload for f in full)


def test_failed_rank_is_never_a_reference():
    assert exchange.refs_from([b"x", exchange.FAILED, b"x", exchange.FAILED]) == [None, None, 0, None]


def test_tensor_properties_travel_by_name():
    """Plain TensorProperties travel as a short name string; others as objects; unknown names are refused."""
    import pytest

    from dcplan.errors import PlanMismatchError

    item = workloads.make("ddp", "1b", 2).plans[0].items[0]
    enc = wire.encode_items([item])
    if wire._PROPS_BY_NAME:
        assert all(type(p) is str for p in enc.props)
        assert len(pickle.dumps(enc.props)) < 60  # the object pickles to about 165 bytes
    else:  # torch 2.15+: a sixth field (strides), kept as the object
        assert compat.HAS_STRIDES and all(type(p) is TensorProperties for p in enc.props)
    assert wire.decode_items(pickle.loads(pickle.dumps(enc))) == [item]

    class Odd(TensorProperties):  # not a plain TensorProperties: kept as itself
        pass

    odd = Odd(dtype=torch.float16)
    assert wire.props_spec(odd) is odd and wire.props_object(odd) is odd
    for spec in ("float99|strided|0|contiguous_format|0", "float32|strided|2|contiguous_format|0", "float32|strided"):
        with pytest.raises(PlanMismatchError, match="tensor properties"):
            wire.props_object(spec)
    for dt in DTYPES + [torch.float8_e4m3fn, torch.complex64, torch.bool]:
        for rg in (False, True):
            p = TensorProperties(dtype=dt, requires_grad=rg, pin_memory=not rg)
            back = wire.props_object(wire.props_spec(p))
            assert back == p and back.dtype is dt
