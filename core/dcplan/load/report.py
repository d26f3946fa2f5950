"""The load report: missing, unexpected and mismatched keys."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs


@attrs.frozen
class Mismatch:
    """A requested tensor whose shape or dtype differs from the checkpoint's."""

    key: str
    nested: str
    checkpoint_shape: tuple[int, ...] | None
    state_dict_shape: tuple[int, ...] | None
    checkpoint_dtype: str | None
    state_dict_dtype: str | None

    @property
    def shape_differs(self) -> bool:
        return self.checkpoint_shape != self.state_dict_shape

    @property
    def dtype_differs(self) -> bool:
        return self.checkpoint_dtype != self.state_dict_dtype

    def describe(self) -> str:
        parts = []
        if self.shape_differs:
            parts.append(f"shape {self.checkpoint_shape} in the checkpoint vs {self.state_dict_shape} requested")
        if self.dtype_differs:
            parts.append(f"dtype {self.checkpoint_dtype} in the checkpoint vs {self.state_dict_dtype} requested")
        name = self.key if self.nested in ("", self.key) else f"{self.key} ({self.nested})"
        return f"{name}: {', '.join(parts)}"


def _dtype_name(dtype: Any) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def find_mismatches(
    state_dict: Mapping[str, Any], metadata: Any, nested_key: Callable[[str], str] = str
) -> list[Mismatch]:
    """The requested tensors (of a flattened ``state_dict``) whose shape or dtype differs from the checkpoint's.

    The one shape/dtype comparison of a load: :class:`dcplan.LoadPlanner` reports
    these, and the built-in local load plan refuses the shape mismatches.
    """
    import torch

    from dcplan.compat import TensorStorageMetadata

    md = metadata.state_dict_metadata
    out = []
    for fqn in sorted(state_dict):
        entry = md.get(fqn)
        obj = state_dict[fqn]
        if not isinstance(entry, TensorStorageMetadata) or not isinstance(obj, torch.Tensor):
            continue
        shape = tuple(int(s) for s in obj.size())
        ck_shape = tuple(int(s) for s in entry.size)
        ck_dtype = _dtype_name(getattr(entry.properties, "dtype", None))
        sd_dtype = _dtype_name(obj.dtype)
        if ck_shape != shape or ck_dtype != sd_dtype:
            out.append(Mismatch(fqn, nested_key(fqn), ck_shape, shape, ck_dtype, sd_dtype))
    return out


def _pairs(keys: Sequence[str], nested: Sequence[str]) -> tuple[tuple[str, str], ...]:
    return tuple(zip(keys, nested))


@attrs.frozen
class LoadReport:
    """What a load planned: keys requested but missing, present but not requested, mismatched.

    Keys are flattened (``optim.state.0.exp_avg``); each comes with the user's nested
    spelling (``optim['state'][0]['exp_avg']``).

    :ivar missing: ``(key, nested)`` requested, not in the checkpoint (skipped by a partial load).
    :ivar unexpected: ``(key, nested)`` in the checkpoint, not requested (by any rank, once merged).
    :ivar mismatched: shape or dtype mismatches. A dtype mismatch is cast on copy like torch does;
        a shape mismatch is an error unless the key matches ``skip_mismatch_keys``.
    :ivar skipped: keys left untouched (missing or allowed mismatches).
    :ivar ranks: how many ranks' reports were merged (1 before merging).
    """

    missing: tuple[tuple[str, str], ...] = ()
    unexpected: tuple[tuple[str, str], ...] = ()
    mismatched: tuple[Mismatch, ...] = ()
    skipped: tuple[str, ...] = ()
    ranks: int = 1

    @property
    def missing_keys(self) -> list[str]:
        return [k for k, _ in self.missing]

    @property
    def unexpected_keys(self) -> list[str]:
        return [k for k, _ in self.unexpected]

    @property
    def mismatched_keys(self) -> list[str]:
        return [m.key for m in self.mismatched]

    @property
    def clean(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def to_dict(self) -> dict[str, Any]:
        return {
            "missing": [{"key": k, "nested": n} for k, n in self.missing],
            "unexpected": [{"key": k, "nested": n} for k, n in self.unexpected],
            "mismatched": [attrs.asdict(m) for m in self.mismatched],
            "skipped": list(self.skipped),
            "ranks": self.ranks,
        }

    def format(self, limit: int = 20) -> str:
        """A few human-readable lines (at most ``limit`` keys per section)."""

        def show(pairs: Sequence[tuple[str, str]]) -> str:
            names = [k if n in ("", k) else f"{k} ({n})" for k, n in pairs[:limit]]
            more = f" ... and {len(pairs) - limit} more" if len(pairs) > limit else ""
            return ", ".join(names) + more

        lines = [f"dcplan load report ({self.ranks} rank(s)):"]
        lines.append(f"  missing (requested, not in the checkpoint): {len(self.missing)}"
                     + (f": {show(self.missing)}" if self.missing else ""))
        lines.append(f"  unexpected (in the checkpoint, not requested): {len(self.unexpected)}"
                     + (f": {show(self.unexpected)}" if self.unexpected else ""))
        lines.append(f"  mismatched: {len(self.mismatched)}")
        lines += [f"    {m.describe()}" for m in self.mismatched[:limit]]
        if self.skipped:
            lines.append(f"  skipped: {len(self.skipped)}")
        return "\n".join(lines)

    @classmethod
    def merge(cls, reports: Sequence[LoadReport]) -> LoadReport:
        """Merge ranks' reports: union of missing/mismatched/skipped, intersection of unexpected."""
        if not reports:
            return cls(ranks=0)
        missing: dict[str, str] = {}
        mism: dict[str, Mismatch] = {}
        skipped: set[str] = set()
        unexpected = dict(reports[0].unexpected)
        for r in reports:
            missing.update(r.missing)
            for m in r.mismatched:
                mism.setdefault(m.key, m)
            skipped.update(r.skipped)
            keep = {k for k, _ in r.unexpected}
            unexpected = {k: v for k, v in unexpected.items() if k in keep}
        return cls(
            missing=tuple(sorted(missing.items())),
            unexpected=tuple(sorted(unexpected.items())),
            mismatched=tuple(mism[k] for k in sorted(mism)),
            skipped=tuple(sorted(skipped)),
            ranks=len(reports),
        )

