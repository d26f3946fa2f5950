"""Build synthetic ``SavePlan`` objects without processes (tests, benchmarks, the kit)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from dcplan import compat
from dcplan.compat import (
    ChunkStorageMetadata,
    MetadataIndex,
    SavePlan,
    TensorProperties,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)

__all__ = ["tensor_item", "bytes_item", "plan", "replicated_plans"]


def tensor_item(
    fqn: str,
    size: Sequence[int],
    offsets: Sequence[int] | None = None,
    sizes: Sequence[int] | None = None,
    dtype: torch.dtype = torch.float32,
    shard: bool | None = None,
) -> WriteItem:
    """A tensor item; a SHARD when the chunk is not the whole tensor (or ``shard=True``)."""
    size = tuple(size)
    offsets = tuple(offsets) if offsets is not None else (0,) * len(size)
    sizes = tuple(sizes) if sizes is not None else size
    whole = offsets == (0,) * len(size) and sizes == size
    return compat.make_write_item(
        index=MetadataIndex(fqn, torch.Size(offsets)),
        type=WriteItemType.SHARD if (shard if shard is not None else not whole) else WriteItemType.TENSOR,
        tensor_data=TensorWriteData(
            chunk=ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes)),
            properties=TensorProperties(dtype=dtype),
            size=torch.Size(size),
        ),
    )


def bytes_item(fqn: str, nbytes: int | None = None) -> WriteItem:
    return compat.make_write_item(index=MetadataIndex(fqn), type=WriteItemType.BYTE_IO, nbytes=nbytes)


def plan(items: Iterable[WriteItem]) -> SavePlan:
    return SavePlan(list(items))


def replicated_plans(world_size: int, items: Sequence[WriteItem]) -> list[SavePlan]:
    """Every rank holds every item (DDP)."""
    return [SavePlan(list(items)) for _ in range(world_size)]
