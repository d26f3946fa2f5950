"""Bit-exact comparison of state dicts, shared by the functions run on gloo ranks (importable on every rank)."""

from __future__ import annotations

from typing import Any

import torch

from dcplan import compat


def bits(t: torch.Tensor) -> bytes:
    """A tensor's raw bytes (a DTensor's whole tensor), so NaN payloads and -0.0 compare exactly."""
    if isinstance(t, compat.DTensor):
        t = t.full_tensor()
    return t.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()


def flat(sd: dict[str, Any]) -> dict[str, Any]:
    """The flattened state dict with each tensor as (bytes, dtype, shape): ``==`` is a bit-exact comparison."""
    flat_sd, _ = compat.flatten_state_dict(sd)
    return {k: (bits(v), str(v.dtype), tuple(v.shape)) if isinstance(v, torch.Tensor) else v for k, v in flat_sd.items()}
