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
import random
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
    "ep_dp",
    "stage_layers",
    "random_layout",
    "random_layouts",
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


def _stage_params(
    m: ModelShape, stage: int, stages: int, uneven: bool = False
) -> list[tuple[str, tuple[int, ...]]]:
    """Parameters of pipeline stage ``stage`` (layers split by :func:`stage_layers`)."""
    counts = stage_layers(m.layers, stages, uneven)
    lo = sum(counts[:stage])
    hi = lo + counts[stage]
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
    m: ModelShape,
    *,
    adam: bool = True,
    stage: int = 0,
    stages: int = 1,
    dtype: torch.dtype = torch.bfloat16,
    uneven: bool = False,
) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """``(fqn, global shape, dtype)`` of a stage's parameters and (``adam``) optimizer state."""
    out: list[tuple[str, tuple[int, ...], torch.dtype]] = []
    params = _stage_params(m, stage, stages, uneven)
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
    model: str | ModelShape,
    tp: int,
    pp: int,
    dp: int,
    *,
    adam: bool = True,
    distinct: bool = False,
    uneven: bool = False,
) -> list[SavePlan]:
    """Megatron-style TP x PP x DP (no distributed optimizer: DP replicates everything).

    :param uneven: the first and last stages hold fewer layers (they also hold
        the embedding and the head), see :func:`stage_layers`.
    """
    m = _model(model)
    if pp > m.layers:
        raise ValueError(f"tp_pp_dp: {pp} pipeline stages for a model of {m.layers} layers; use pp <= {m.layers}")
    world = tp * pp * dp
    per_rank: list[list[WriteItem]] = [[] for _ in range(world)]
    for stage in range(pp):
        stage_items: list[list[WriteItem]] = [[] for _ in range(tp)]
        for fqn, shape, dtype in model_tensors(m, adam=adam, stage=stage, stages=pp, uneven=uneven):
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


_SPEC = re.compile(
    r"^(?P<layout>ddp|fsdp|hsdp(?P<shard>\d+)?|tp(?P<tp>\d+)pp(?P<pp>\d+)dp(?P<dp>\d+)(?P<uneven>u)?"
    r"|ep(?P<ep>\d+)dp(?P<epdp>\d+)|random(?P<seed>\d+))$"
)


def parse(spec: str) -> tuple[str, dict[str, int]]:
    """``"hsdp8"`` -> ``("hsdp", {"shard": 8})``; ``"tp8pp8dp64"`` -> ``("tp_pp_dp", {...})``.

    Also ``tp<T>pp<P>dp<D>u`` (uneven stages), ``ep<E>dp<D>`` (experts over E
    ranks, replicated over D) and ``random<SEED>`` (:func:`random_layout`).
    """
    mt = _SPEC.match(spec.lower().replace("_", "").replace("x", ""))
    if mt is None:
        raise ValueError(
            f"unknown layout {spec!r}; use ddp, fsdp, hsdp (or hsdp<shard>, e.g. hsdp8) or tp<T>pp<P>dp<D> "
            "(e.g. tp8pp8dp64; tp8pp8dp64u for uneven stages), ep<E>dp<D> (e.g. ep8dp8) or random<SEED>"
        )
    if mt["tp"]:
        return "tp_pp_dp", {
            "tp": int(mt["tp"]), "pp": int(mt["pp"]), "dp": int(mt["dp"]), "uneven": int(bool(mt["uneven"]))
        }
    if mt["ep"]:
        return "ep_dp", {"ep": int(mt["ep"]), "dp": int(mt["epdp"])}
    if mt["seed"]:
        return "random", {"seed": int(mt["seed"])}
    if mt["layout"].startswith("hsdp"):
        return "hsdp", {"shard": int(mt["shard"] or 8)}
    return mt["layout"], {}


def make(
    layout: str, model: str = "7b", world: int | None = None, *, adam: bool = True, distinct: bool = False
) -> Workload:
    """Build a workload from a layout spec (see :func:`parse`) and a model size.

    :param world: rank count for ``ddp``/``fsdp``/``hsdp`` (ignored by ``tp..pp..dp``
        and ``ep..dp..``, whose world is the product; optional for ``random<SEED>``).
    """
    kind, args = parse(layout)
    if kind == "tp_pp_dp":
        uneven = bool(args["uneven"])
        plans = tp_pp_dp(model, args["tp"], args["pp"], args["dp"], adam=adam, distinct=distinct, uneven=uneven)
        name = f"{model} tp{args['tp']}pp{args['pp']}dp{args['dp']}{'u' if uneven else ''}"
    elif kind == "ep_dp":
        plans = ep_dp(model, args["ep"], args["dp"], adam=adam, distinct=distinct)
        name = f"{model} ep{args['ep']}dp{args['dp']}"
    elif kind == "random":
        return random_layout(args["seed"], world=world)
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
    ("tp4pp8dp8u", "13b", None),
    ("ep8dp8", "8b", None),
    ("ep6dp16", "1b", None),
    ("ddp", "7b", 4096),
    ("hsdp8", "8b", 4096),
)

QUICK: tuple[tuple[str, str, int | None], ...] = (
    ("ddp", "7b", 8),
    ("ddp", "70b", 64),
    ("fsdp", "1b", 32),
    ("hsdp8", "7b", 64),
    ("tp2pp2dp16", "7b", None),
    ("tp2pp4dp4u", "1b", None),
    ("ep4dp4", "1b", None),
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


# -- expert parallel, uneven pipelines, random layouts (issue 15) ---------------------------------


def stage_layers(layers: int, stages: int, uneven: bool) -> list[int]:
    """Layers per pipeline stage; ``uneven``: the first and last stages (embedding, head) get fewer."""
    if not uneven or stages < 3 or layers < 2 * stages:
        per, extra = divmod(layers, stages)
        return [per + (1 if s < extra else 0) for s in range(stages)]
    edge = max(1, layers // stages - 2)
    inner, extra = divmod(layers - 2 * edge, stages - 2)
    return [edge] + [inner + (1 if s < extra else 0) for s in range(stages - 2)] + [edge]


def ep_dp(
    model: str | ModelShape, ep: int, dp: int, *, experts: int = 8, adam: bool = True, distinct: bool = False
) -> list[SavePlan]:
    """Mixture of experts: attention, norms and embeddings replicated on every rank; each layer's
    ``experts`` MLPs spread over ``ep`` ranks (expert ``e`` on ep rank ``e % ep``; uneven when ``ep``
    does not divide ``experts``) and replicated over ``dp`` (rank = ep_idx + ep * dp_idx)."""
    m = _model(model)
    world = ep * dp
    per_rank: list[list[WriteItem]] = [[] for _ in range(world)]
    dense: list[tuple[str, tuple[int, ...], torch.dtype]] = []
    expert_of: dict[str, int] = {}
    for fqn, shape, dtype in model_tensors(m, adam=adam):
        if ".mlp.gate." in fqn or ".mlp.up." in fqn or ".mlp.down." in fqn:
            for e in range(experts):
                efqn = fqn.replace(".mlp.", f".mlp.experts.{e}.")
                expert_of[efqn] = e % ep
                dense.append((efqn, shape, dtype))
        else:
            dense.append((fqn, shape, dtype))
    for fqn, shape, dtype in dense:
        it = _item(fqn, shape, (0,) * len(shape), shape, dtype)
        home = expert_of.get(fqn)
        ranks = range(world) if home is None else [home + ep * d for d in range(dp)]
        for r in ranks:
            per_rank[r].append(it)
    return _finish(per_rank, distinct)


def _rng(seed: int | random.Random) -> random.Random:
    return seed if isinstance(seed, random.Random) else random.Random(seed)


_RANDOM_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.uint8, torch.float64)


def _random_shape(rng: random.Random, dtype: torch.dtype, lo: int = 12, hi: int = 30) -> tuple[int, int]:
    """A 2-D shape of 2**lo .. 2**hi bytes (log-uniform; 4 KiB .. 1 GiB by default)."""
    nbytes = int(2 ** rng.uniform(lo, hi))
    cols = 256
    rows = max(1, nbytes // (cols * dtype.itemsize))
    return (rows, cols)


class _Builder:
    """Collects the items of a random layout, each chunk with the ranks holding it."""

    def __init__(self, world: int, rng: random.Random, size_range: tuple[int, int]) -> None:
        self.world = world
        self.rng = rng
        self.per_rank: list[list[WriteItem]] = [[] for _ in range(world)]
        self.n = 0
        self.size_range = size_range

    def tensor(self, holders_per_part: Sequence[Sequence[int]], *, uneven: bool = False, tag: str = "t") -> None:
        """One tensor cut on dim 0 into ``len(holders_per_part)`` chunks; chunk ``i`` held by ``holders_per_part[i]``."""
        rng = self.rng
        dtype = rng.choice(_RANDOM_DTYPES)
        rows, cols = _random_shape(rng, dtype, *self.size_range)
        parts = len(holders_per_part)
        fqn = f"{tag}{self.n}"
        self.n += 1
        if parts == 1:
            cuts = [0, rows]
        elif uneven and rows > parts:
            cuts = [0, *sorted(rng.sample(range(1, rows), parts - 1)), rows]
        else:
            cuts = [lo for lo, _ in _chunks(rows, parts)] + [rows]
        for i, hs in enumerate(holders_per_part):
            lo, hi = cuts[i], cuts[i + 1]
            if hi <= lo:
                continue
            it = _item(fqn, (rows, cols), (lo, 0), (hi - lo, cols), dtype)
            for r in sorted(set(hs)):
                self.per_rank[r].append(it)

    def obj(self, holders: Sequence[int]) -> None:
        from dcplan.compat import make_write_item

        it = make_write_item(
            index=MetadataIndex(f"obj{self.n}"), type=WriteItemType.BYTE_IO, nbytes=self.rng.randint(1, 4096)
        )
        self.n += 1
        for r in sorted(set(holders)):
            self.per_rank[r].append(it)


def _groups(rng: random.Random, ranks: Sequence[int], size: int) -> list[list[int]]:
    """Split ``ranks`` into groups of ``size``: contiguous, strided, or shuffled."""
    n = len(ranks) // size
    how = rng.choice(("contiguous", "strided", "shuffled"))
    rs = list(ranks)
    if how == "shuffled":
        rng.shuffle(rs)
    if how == "strided":
        return [[rs[i + n * j] for j in range(size)] for i in range(n)]
    return [rs[i * size : (i + 1) * size] for i in range(n)]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _style_ddp(b: _Builder) -> None:
    for _ in range(b.rng.randint(1, 12)):
        b.tensor([list(range(b.world))])


def _style_hsdp(b: _Builder) -> None:
    rng = b.rng
    shard = rng.choice(_divisors(b.world))
    uneven = rng.random() < 0.5
    groups = _groups(rng, range(b.world), shard)  # each group shards one copy
    for _ in range(rng.randint(1, 12)):
        b.tensor([[g[i] for g in groups] for i in range(shard)], uneven=uneven)
    for _ in range(rng.randint(0, 4)):  # small replicated state (step counters, norms)
        b.tensor([list(range(b.world))])


def _factor(rng: random.Random, n: int, k: int) -> list[int]:
    out = []
    for _ in range(k - 1):
        d = rng.choice(_divisors(n))
        out.append(d)
        n //= d
    return out + [n]


def _style_tp_pp_dp_cp(b: _Builder) -> None:
    """TP x CP x DP x PP with uneven stages; TP-split and TP-replicated tensors, replicated over CP x DP."""
    rng = b.rng
    tp, cp, dp, pp = _factor(rng, b.world, 4)
    layers = [rng.randint(1, 4) for _ in range(pp)]

    def rank(t: int, c: int, d: int, s: int) -> int:
        return t + tp * (c + cp * (d + dp * s))

    for s in range(pp):
        for _ in range(layers[s] * rng.randint(1, 3)):
            reps = [(c, d) for c in range(cp) for d in range(dp)]
            if rng.random() < 0.7 and tp > 1:  # TP-split
                b.tensor([[rank(t, c, d, s) for c, d in reps] for t in range(tp)])
            else:  # replicated over TP too (norms, biases)
                b.tensor([[rank(t, c, d, s) for c, d in reps for t in range(tp)]])


def _style_ep(b: _Builder) -> None:
    """Experts on subsets of an EP group, replicated over DP; dense parts on every rank."""
    rng = b.rng
    ep = rng.choice(_divisors(b.world))
    dp = b.world // ep
    experts = rng.randint(1, 3 * ep)
    for _ in range(rng.randint(1, 3)):  # layers
        b.tensor([list(range(b.world))])
        for e in range(experts):
            home = e % ep if rng.random() < 0.8 else rng.randrange(ep)
            b.tensor([[home + ep * d for d in range(dp)]])


def _style_random_groups(b: _Builder) -> None:
    rng = b.rng
    for _ in range(rng.randint(1, 10)):
        k = rng.randint(1, b.world)
        if rng.random() < 0.5:  # contiguous or strided run
            start = rng.randrange(b.world)
            step = rng.choice((1, 1, 2, 3))
            hs = sorted({(start + step * i) % b.world for i in range(k)})
        else:
            hs = sorted(rng.sample(range(b.world), k))
        b.tensor([hs])


_STYLES = {
    "ddp": _style_ddp,
    "hsdp": _style_hsdp,
    "tp_pp_dp_cp": _style_tp_pp_dp_cp,
    "ep": _style_ep,
    "groups": _style_random_groups,
}


def random_layout(
    seed: int | random.Random,
    *,
    world: int | None = None,
    min_world: int = 2,
    max_world: int = 16,
    size_range: tuple[int, int] = (12, 30),
    styles: Sequence[str] | None = None,
) -> Workload:
    """A random layout: one to three of DDP, FSDP/HSDP (uneven shards), TP x CP x DP x PP (uneven
    stages), expert parallel, arbitrary contiguous/strided/shuffled replica groups; plus rank-local
    items and object items; mixed dtypes; item sizes log-uniform in ``2**size_range`` bytes
    (4 KiB .. 1 GiB by default). Same seed, same plans.
    """
    rng = _rng(seed)
    n = world if world is not None else rng.randint(min_world, max_world)
    b = _Builder(n, rng, size_range)
    names = list(styles) if styles is not None else rng.sample(sorted(_STYLES), rng.randint(1, 3))
    for name in names:
        _STYLES[name](b)
    for _ in range(rng.randint(0, 2 * n) if rng.random() < 0.6 else 0):  # rank-local items
        b.tensor([[rng.randrange(n)]], tag="local")
    for _ in range(rng.randint(0, 3)):
        b.obj(rng.sample(range(n), rng.randint(1, n)))
    plans = [SavePlan(items) for items in b.per_rank]
    label = seed if isinstance(seed, int) else "rng"
    return Workload(name=f"random {label} ({'+'.join(names)}) x{n}", plans=plans)


def random_layouts(count: int, seed: int = 0, **kwargs: object) -> Iterator[Workload]:
    """``count`` random layouts from one seeded generator (see :func:`random_layout`)."""
    rng = random.Random(seed)
    for i in range(count):
        wl = random_layout(rng, **kwargs)  # type: ignore[arg-type]
        yield attrs.evolve(wl, name=wl.name.replace("random rng", f"random {seed}/{i}"))
