"""Step 5 of a save, on the coordinator: the global plan's metadata and index hints."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from dcplan import compat
from dcplan.compat import (
    BytesStorageMetadata,
    Metadata,
    SavePlan,
    TensorStorageMetadata,
    WriteItem,
    WriteItemType,
)


def build_global_plan(
    all_plans: Sequence[SavePlan], *, merge_planner_data: bool = True
) -> tuple[list[SavePlan], Metadata, list[str]]:
    """Build the metadata from deduped plans and rewrite index hints.

    :returns: ``(global_plan, metadata, errors)``. ``errors`` lists items written
        twice and tensors whose ranks disagree on dtype or global size; the
        caller refuses to save when it is non-empty.
    """
    md: dict[str, Any] = {}
    owner: dict[str, int] = {}
    errors: list[str] = []
    seen_chunks: set[tuple[str, Any]] = set()
    seen_add = seen_chunks.add
    md_get = md.get
    new_plans: list[SavePlan] = []
    byte_io, shard = WriteItemType.BYTE_IO, WriteItemType.SHARD
    tsm = TensorStorageMetadata
    with_hint = compat.with_index_hint
    for rank, plan in enumerate(all_plans):
        new_items: list[WriteItem] = []
        append = new_items.append
        for item in plan.items:
            fqn = item.index.fqn
            if item.type is byte_io:
                if fqn in md:
                    errors.append(
                        f"key:{fqn} is written by rank {owner[fqn]} and rank {rank} "
                        "(the dedup strategy must give each item to exactly one rank)"
                    )
                    continue
                md[fqn] = BytesStorageMetadata()
                owner[fqn] = rank
                append(item)
                continue
            td = item.tensor_data
            if td is None or td.chunk is None:
                errors.append(f"key:{fqn} has a tensor item without chunk bounds (rank {rank})")
                continue
            chunk = td.chunk
            existing = md_get(fqn)
            if existing is None:
                existing = tsm(properties=td.properties, size=td.size, chunks=[])
                md[fqn] = existing
                owner[fqn] = rank
            elif existing.__class__ is not tsm:
                errors.append(f"key:{fqn} is a tensor on rank {rank} but an object on rank {owner[fqn]}")
                continue
            else:
                if existing.properties.dtype is not td.properties.dtype and (
                    existing.properties.dtype != td.properties.dtype
                ):
                    errors.append(
                        f"key:{fqn} has dtype {existing.properties.dtype} on rank {owner[fqn]} "
                        f"but {td.properties.dtype} on rank {rank}"
                    )
                if existing.size != td.size and tuple(existing.size) != tuple(td.size):
                    errors.append(
                        f"key:{fqn} has global size {tuple(existing.size)} on rank {owner[fqn]} "
                        f"but {tuple(td.size)} on rank {rank}"
                    )
                if item.type is not shard:
                    errors.append(
                        f"key:{fqn} is written by rank {owner[fqn]} and rank {rank} "
                        "(the dedup strategy must give each item to exactly one rank)"
                    )
                    continue
            ck: tuple[str, Any] = (fqn, chunk.offsets)  # torch.Size hashes and compares as a tuple
            try:
                dup = ck in seen_chunks
            except TypeError:  # offsets given as a list by a plugin
                ck = (fqn, tuple(chunk.offsets))
                dup = ck in seen_chunks
            if dup:
                errors.append(
                    f"key:{fqn} chunk at offset {tuple(chunk.offsets)} is written twice "
                    f"(again by rank {rank})"
                )
                continue
            seen_add(ck)
            chunks = existing.chunks
            append(with_hint(item, len(chunks)))
            chunks.append(chunk)
        new_plans.append(compat.replace_plan(plan, items=new_items))

    metadata = Metadata(state_dict_metadata=md)
    if merge_planner_data:
        merged: dict[str, Any] = {}
        for plan in new_plans:
            if isinstance(plan.planner_data, dict):
                merged.update(plan.planner_data)
        metadata = dataclasses.replace(metadata, planner_data=merged)
    return new_plans, metadata, errors


# ---------------------------------------------------------------- validation
