"""Synthetic save workloads: the local plans real training layouts produce, without processes.

Used by ``dcplan plan``, the benchmarks and the tests. A workload is one local
``SavePlan`` per rank, as ``dcp.save`` would gather them on the coordinator:

* ``ddp``: every rank holds every tensor whole (replicated ``world`` times);
* ``fsdp``: every tensor sharded along dim 0 over all ranks (FSDP2 ``Shard(0)``);
* ``hsdp``: sharded over ``shard`` ranks, replicated over ``world / shard``;
* ``tp_pp_dp``: Megatron-style tensor x pipeline x data parallel: layers split
  over ``pp`` stages, column-parallel weights split on dim 0 and row-parallel on
  dim 1 over ``tp`` ranks, norms replicated across TP, everything replicated
  over ``dp`` (rank = tp_idx + tp * (dp_idx + dp * pp_idx)).

Models are decoder-only transformers with named sizes (:data:`MODELS`); with
``adam=True`` each parameter gets fp32 ``exp_avg`` / ``exp_avg_sq`` states and a
0-d ``step`` tensor (replicated wherever its parameter's rank group lives).

Plans are built cheaply: items are created once per distinct chunk and shared
by every rank holding them (only the lists differ), so 2M plan entries take a
few seconds. Pass ``distinct=True`` to give each rank its own ``WriteItem`` and
``MetadataIndex`` objects, as unpickled gathered plans have.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence

import attrs
import torch

from dcplan.compat import (
    ChunkStorageMetadata,
    MetadataIndex,
    SavePlan,
    TensorProperties,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)

__all__ = [
    "MODELS",
    "LAYOUTS",
    "ModelShape",
    "Workload",
    "model_tensors",
    "ddp",
    "fsdp",
    "hsdp",
    "tp_pp_dp",
    "make",
    "parse",
    "standard_workloads",
]


@attrs.frozen
class ModelShape:
    """A decoder-only transformer (Llama-style, SwiGLU MLP, grouped-query attention)."""

    name: str
    hidden: int
    layers: int
    ffn: int
    vocab: int
    heads: int
    kv_heads: int

    @property
    def params(self) -> int:
        return sum(math.prod(s) for _, s, _ in model_tensors(self, adam=False))


#: Named model sizes (Llama-2 7B/13B, Llama-3 8B/70B, and small ones for tests).
MODELS: dict[str, ModelShape] = {
    "tiny": ModelShape("tiny", hidden=64, layers=2, ffn=176, vocab=256, heads=4, kv_heads=2),
    "125m": ModelShape("125m", hidden=768, layers=12, ffn=2048, vocab=32000, heads=12, kv_heads=12),
    "1b": ModelShape("1b", hidden=2048, layers=16, ffn=5632, vocab=32000, heads=16, kv_heads=8),
    "7b": ModelShape("7b", hidden=4096, layers=32, ffn=11008, vocab=32000, heads=32, kv_heads=32),
    "8b": ModelShape("8b", hidden=4096, layers=32, ffn=14336, vocab=128256, heads=32, kv_heads=8),
    "13b": ModelShape("13b", hidden=5120, layers=40, ffn=13824, vocab=32000, heads=40, kv_heads=40),
    "70b": ModelShape("70b", hidden=8192, layers=80, ffn=28672, vocab=128256, heads=64, kv_heads=8),
}

LAYOUTS = ("ddp", "fsdp", "hsdp", "tp_pp_dp")

#: parallel style of each weight under tensor parallelism: dim split, or None (replicated)
_TP_DIM = {
    "attn.q.weight": 0,
    "attn.k.weight": 0,
    "attn.v.weight": 0,
    "attn.o.weight": 1,
    "mlp.gate.weight": 0,
    "mlp.up.weight": 0,
    "mlp.down.weight": 1,
    "attn_norm.weight": None,
    "mlp_norm.weight": None,
    "embed.weight": 0,
    "norm.weight": None,
    "lm_head.weight": 0,
}


def _layer_params(m: ModelShape, i: int) -> list[tuple[str, tuple[int, ...]]]:
    h, f, kv = m.hidden, m.ffn, m.hidden // m.heads * m.kv_heads
    p = f"model.layers.{i}."
    return [
        (p + "attn_norm.weight", (h,)),
        (p + "attn.q.weight", (h, h)),
        (p + "attn.k.weight", (kv, h)),
        (p + "attn.v.weight", (kv, h)),
        (p + "attn.o.weight", (h, h)),
        (p + "mlp_norm.weight", (h,)),
        (p + "mlp.gate.weight", (f, h)),
        (p + "mlp.up.weight", (f, h)),
        (p + "mlp.down.weight", (h, f)),
    ]


def _stage_params(m: ModelShape, stage: int, stages: int) -> list[tuple[str, tuple[int, ...]]]:
    """Parameters of pipeline stage ``stage`` (layers split as evenly as possible)."""
    per, extra = divmod(m.layers, stages)
    lo = stage * per + min(stage, extra)
    hi = lo + per + (1 if stage < extra else 0)
    out: list[tuple[str, tuple[int, ...]]] = []
    if stage == 0:
        out.append(("model.embed.weight", (m.vocab, m.hidden)))
    for i in range(lo, hi):
        out += _layer_params(m, i)
    if stage == stages - 1:
        out.append(("model.norm.weight", (m.hidden,)))
        out.append(("lm_head.weight", (m.vocab, m.hidden)))
    return out


def model_tensors(
    m: ModelShape, *, adam: bool = True, stage: int = 0, stages: int = 1, dtype: torch.dtype = torch.bfloat16
) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """``(fqn, global shape, dtype)`` of a stage's parameters and (``adam``) optimizer state."""
    out: list[tuple[str, tuple[int, ...], torch.dtype]] = []
    params = _stage_params(m, stage, stages)
    for fqn, shape in params:
        out.append((fqn, shape, dtype))
    if adam:
        for fqn, shape in params:
            out.append((f"optim.state.{fqn}.exp_avg", shape, torch.float32))
            out.append((f"optim.state.{fqn}.exp_avg_sq", shape, torch.float32))
            out.append((f"optim.state.{fqn}.step", (), torch.float32))
    return out


def _base(fqn: str) -> str:
    """The parameter suffix used to look up its TP style (``attn.q.weight``)."""
    if fqn.startswith("optim.state."):
        fqn = fqn[len("optim.state.") :].rsplit(".", 1)[0]
    parts = fqn.split(".")
    if parts[0] == "model" and parts[1] == "layers":
        return ".".join(parts[3:])
    return ".".join(parts[1:]) if parts[0] == "model" else fqn


_PROPS: dict[torch.dtype, TensorProperties] = {}


def _props(dtype: torch.dtype) -> TensorProperties:
    p = _PROPS.get(dtype)
    if p is None:
        p = _PROPS[dtype] = TensorProperties(dtype=dtype)
    return p


def _item(fqn: str, size: Sequence[int], offsets: Sequence[int], sizes: Sequence[int], dtype: torch.dtype) -> WriteItem:
    size_t = torch.Size(size)
    off_t = torch.Size(offsets)
    whole = tuple(sizes) == tuple(size) and not any(offsets)
    return WriteItem(
        index=MetadataIndex(fqn, off_t),
        type=WriteItemType.TENSOR if whole else WriteItemType.SHARD,
        tensor_data=TensorWriteData(
            chunk=ChunkStorageMetadata(offsets=off_t, sizes=torch.Size(sizes)),
            properties=_props(dtype),
            size=size_t,
        ),
    )


def _chunks(length: int, parts: int) -> list[tuple[int, int]]:
    """torch.chunk / DTensor ``Shard`` split of ``length`` into ``parts``: (offset, size), empty last parts kept."""
    step = -(-length // parts) if parts else length
    out = []
    for i in range(parts):
        lo = min(i * step, length)
        out.append((lo, max(0, min(step, length - lo))))
    return out


def _shard_items(
    fqn: str, shape: tuple[int, ...], dtype: torch.dtype, dim: int | None, parts: int
) -> list[WriteItem | None]:
    """One item per part (``None`` for an empty part); ``dim=None`` or 0-d: the whole tensor each time."""
    if dim is None or not shape or parts == 1:
        it = _item(fqn, shape, (0,) * len(shape), shape, dtype)
        return [it] * parts
    out: list[WriteItem | None] = []
    for lo, n in _chunks(shape[dim], parts):
        if n == 0:
            out.append(None)
            continue
        offsets = [0] * len(shape)
        offsets[dim] = lo
        sizes = list(shape)
        sizes[dim] = n
        out.append(_item(fqn, shape, offsets, sizes, dtype))
    return out


def _copy(item: WriteItem) -> WriteItem:
    """A copy with its own index, offset and fqn string objects (as an unpickled plan has)."""
    idx = item.index
    fqn = (" " + idx.fqn)[1:]  # an equal string, not the same object
    return WriteItem(
        index=MetadataIndex(fqn, torch.Size(idx.offset) if idx.offset is not None else None),
        type=item.type,
        tensor_data=item.tensor_data,
    )


def _finish(per_rank: list[list[WriteItem]], distinct: bool) -> list[SavePlan]:
    if distinct:
        return [SavePlan([_copy(i) for i in items]) for items in per_rank]
    return [SavePlan(items) for items in per_rank]


def ddp(model: str | ModelShape, world: int, *, adam: bool = True, distinct: bool = False) -> list[SavePlan]:
    """Every rank holds every tensor whole."""
    m = _model(model)
    items = [_item(f, s, (0,) * len(s), s, d) for f, s, d in model_tensors(m, adam=adam)]
    return _finish([list(items) for _ in range(world)], distinct)


def fsdp(model: str | ModelShape, world: int, *, adam: bool = True, distinct: bool = False) -> list[SavePlan]:
    """Every tensor sharded on dim 0 over all ranks; 0-d ``step`` tensors replicated everywhere."""
    return hsdp(model, world, shard=world, adam=adam, distinct=distinct)


def hsdp(
    model: str | ModelShape, world: int, *, shard: int = 8, adam: bool = True, distinct: bool = False
) -> list[SavePlan]:
    """Sharded on dim 0 over ``shard`` consecutive ranks, replicated over ``world // shard`` groups."""
    if shard < 1 or world % shard:
        raise ValueError(f"hsdp: world size {world} is not a multiple of the shard group size {shard}")
    m = _model(model)
    per_rank: list[list[WriteItem]] = [[] for _ in range(world)]
    for fqn, shape, dtype in model_tensors(m, adam=adam):
        parts = _shard_items(fqn, shape, dtype, 0, shard)
        for r in range(world):
            it = parts[r % shard]
            if it is not None:
                per_rank[r].append(it)
    return _finish(per_rank, distinct)


def tp_pp_dp(
    model: str | ModelShape, tp: int, pp: int, dp: int, *, adam: bool = True, distinct: bool = False
) -> list[SavePlan]:
    """Megatron-style TP x PP x DP (no distributed optimizer: DP replicates everything)."""
    m = _model(model)
    if pp > m.layers:
        raise ValueError(f"tp_pp_dp: {pp} pipeline stages for a model of {m.layers} layers; use pp <= {m.layers}")
    world = tp * pp * dp
    per_rank: list[list[WriteItem]] = [[] for _ in range(world)]
    for stage in range(pp):
        stage_items: list[list[WriteItem]] = [[] for _ in range(tp)]
        for fqn, shape, dtype in model_tensors(m, adam=adam, stage=stage, stages=pp):
            dim = _TP_DIM.get(_base(fqn))
            if dim is not None and len(shape) <= dim:
                dim = None
            for t, it in enumerate(_shard_items(fqn, shape, dtype, dim, tp)):
                if it is not None:
                    stage_items[t].append(it)
        for d in range(dp):
            for t in range(tp):
                per_rank[t + tp * (d + dp * stage)] = list(stage_items[t])
    return _finish(per_rank, distinct)


def _model(model: str | ModelShape) -> ModelShape:
    if isinstance(model, ModelShape):
        return model
    try:
        return MODELS[model.lower()]
    except KeyError:
        raise ValueError(f"unknown model size {model!r}; choose one of: {', '.join(MODELS)}") from None


@attrs.frozen
class Workload:
    """A named set of local plans."""

    name: str
    plans: list[SavePlan] = attrs.field(repr=False)

    @property
    def world_size(self) -> int:
        return len(self.plans)

    @property
    def entries(self) -> int:
        """Plan entries over all ranks (what the coordinator gathers and dedups)."""
        return sum(len(p.items) for p in self.plans)


_SPEC = re.compile(r"^(?P<layout>ddp|fsdp|hsdp(?P<shard>\d+)?|tp(?P<tp>\d+)pp(?P<pp>\d+)dp(?P<dp>\d+))$")


def parse(spec: str) -> tuple[str, dict[str, int]]:
    """``"hsdp8"`` -> ``("hsdp", {"shard": 8})``; ``"tp8pp8dp64"`` -> ``("tp_pp_dp", {...})``."""
    mt = _SPEC.match(spec.lower().replace("_", "").replace("x", ""))
    if mt is None:
        raise ValueError(
            f"unknown layout {spec!r}; use ddp, fsdp, hsdp (or hsdp<shard>, e.g. hsdp8) or tp<T>pp<P>dp<D> "
            "(e.g. tp8pp8dp64)"
        )
    if mt["tp"]:
        return "tp_pp_dp", {"tp": int(mt["tp"]), "pp": int(mt["pp"]), "dp": int(mt["dp"])}
    if mt["layout"].startswith("hsdp"):
        return "hsdp", {"shard": int(mt["shard"] or 8)}
    return mt["layout"], {}


def make(
    layout: str, model: str = "7b", world: int | None = None, *, adam: bool = True, distinct: bool = False
) -> Workload:
    """Build a workload from a layout spec (see :func:`parse`) and a model size.

    :param world: rank count for ``ddp``/``fsdp``/``hsdp`` (ignored by ``tp..pp..dp``,
        whose world is ``tp*pp*dp``).
    """
    kind, args = parse(layout)
    if kind == "tp_pp_dp":
        plans = tp_pp_dp(model, args["tp"], args["pp"], args["dp"], adam=adam, distinct=distinct)
        name = f"{model} tp{args['tp']}pp{args['pp']}dp{args['dp']}"
    else:
        if not world or world < 1:
            raise ValueError(f"layout {layout!r} needs a rank count >= 1 (e.g. --ranks 64)")
        if kind == "ddp":
            plans = ddp(model, world, adam=adam, distinct=distinct)
        elif kind == "fsdp":
            plans = fsdp(model, world, adam=adam, distinct=distinct)
        else:
            plans = hsdp(model, world, shard=args["shard"], adam=adam, distinct=distinct)
        suffix = f"{args['shard']}" if kind == "hsdp" else ""
        name = f"{model} {kind}{suffix} x{world}"
    return Workload(name=name, plans=plans)


#: The benchmark workloads: (layout, model, world).
STANDARD: tuple[tuple[str, str, int | None], ...] = (
    ("ddp", "7b", 8),
    ("ddp", "70b", 64),
    ("fsdp", "7b", 64),
    ("hsdp8", "7b", 64),
    ("hsdp8", "70b", 512),
    ("fsdp", "70b", 512),
    ("tp8pp4dp4", "13b", None),
    ("tp8pp8dp64", "70b", None),
    ("ddp", "7b", 4096),
    ("hsdp8", "8b", 4096),
)

QUICK: tuple[tuple[str, str, int | None], ...] = (
    ("ddp", "7b", 8),
    ("ddp", "70b", 64),
    ("fsdp", "1b", 32),
    ("hsdp8", "7b", 64),
    ("tp2pp2dp16", "7b", None),
)


def standard_workloads(quick: bool = False, only: str | None = None, distinct: bool = False) -> Iterator[Workload]:
    """The benchmark workloads, built lazily one at a time (``only``: name substring filter).

    :param distinct: every rank gets its own item objects, as in plans gathered
        from real processes (slower to build, more memory).
    """
    for layout, model, world in QUICK if quick else STANDARD:
        name = f"{model} {layout}" + (f" x{world}" if world else "")
        if only and only not in name:
            continue
        yield make(layout, model, world, distinct=distinct)
