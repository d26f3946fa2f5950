"""Safe restoring of non-tensor items (extended by the safe-loading work)."""

from __future__ import annotations

import io
from typing import Any

import torch


def load_object(planner: Any, fqn: str, value: io.BytesIO) -> Any:
    """Unpickle one non-tensor item with torch's weights-only unpickler unless trusted."""
    trusted = bool(getattr(getattr(planner, "config", None), "trust_checkpoint", False))
    return torch.load(value, weights_only=not trusted)
