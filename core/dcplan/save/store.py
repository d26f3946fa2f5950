"""Save plans that survive the job: the persistent plan store (``plan_cache_dir``).

At scale, jobs restart often and save the same structure again. With
``plan_cache_dir`` set, the coordinator writes, after a save's global plan
succeeded, one file per *slot* (namespace = the state dict's top-level keys or
``cache_namespace``, world size, planner class and config, strategy and
options, plugin set, dcplan/torch/wire versions): the compact final plans
(:class:`dcplan.save.wire.FinalMsg`) and the checkpoint metadata, with every
rank's exchange digest (:mod:`dcplan.save.exchange`: items, mapping and
agreement of its local plan).

On a later save, also in a new job, the ranks exchange digests as usual; the
coordinator reads the slot and broadcasts whether every digest matches. On a
match every rank sends only its digest (no plan), and the coordinator scatters
the stored final plans and reuses the metadata: no dedup, no metadata build,
no validation. Anything else (a changed rank, a missing, corrupt or
other-version file) falls back to full planning with a log line saying why,
and the slot is rewritten after that save's planning succeeded. A stored plan
is only used when every rank's full plan digest matches, so it is never stale.

The file is JSON compressed with zlib, written to a temporary name and
renamed into place. Loading it unpickles nothing: it rebuilds only
``torch.Size``, dtypes/layouts/memory formats looked up by name,
``TensorProperties``, ``ChunkStorageMetadata``, ``TensorStorageMetadata``,
``BytesStorageMetadata`` and ``Metadata``. Plans or metadata with anything else
in them (an object the format cannot express) are simply not stored.

Not combined with the in-process ``plan_cache``: with both on, the in-process
cache is used and ``plan_cache_dir`` is ignored.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import logging
import os
import tempfile
import zlib
from collections.abc import Sequence
from typing import Any

import attrs
import torch

from dcplan import compat
from dcplan.compat import ChunkStorageMetadata, Metadata, SavePlan, TensorProperties
from dcplan.save import wire

log = logging.getLogger("dcplan")

__all__ = ["PlanStore", "FORMAT"]

FORMAT = 1


class _NotStorable(Exception):
    pass


# ---------------------------------------------------------------- values
def _enc_value(v: Any) -> Any:
    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, int):
        return v
    if isinstance(v, torch.dtype):
        return {"dtype": str(v).rsplit(".", 1)[-1]}
    if isinstance(v, torch.layout):
        return {"layout": str(v).rsplit(".", 1)[-1]}
    if isinstance(v, torch.memory_format):
        return {"memory_format": str(v).rsplit(".", 1)[-1]}
    if isinstance(v, (tuple, list)) and all(type(x) is int for x in v):
        return {"ints": list(v), "kind": type(v).__name__ if type(v) in (tuple, list) else "Size"}
    raise _NotStorable(f"{type(v).__name__} value")


_TORCH_KINDS = {"dtype": torch.dtype, "layout": torch.layout, "memory_format": torch.memory_format}


def _dec_value(v: Any) -> Any:
    if not isinstance(v, dict):
        return v
    if "ints" in v:
        ints = [int(x) for x in v["ints"]]
        make: Any = {"tuple": tuple, "list": list}.get(str(v.get("kind")), torch.Size)
        return make(ints)
    for key, cls in _TORCH_KINDS.items():
        if key in v:
            obj = getattr(torch, str(v[key]), None)
            if not isinstance(obj, cls):
                raise ValueError(f"unknown torch {key} {v[key]!r}")
            return obj
    raise ValueError(f"unknown value {v!r}")


def _enc_props(p: Any) -> dict[str, Any]:
    if type(p) is not TensorProperties:
        raise _NotStorable(f"properties of type {type(p).__name__}")
    return {f.name: _enc_value(getattr(p, f.name)) for f in dataclasses.fields(p)}


def _dec_props(d: dict[str, Any]) -> Any:
    names = {f.name for f in dataclasses.fields(TensorProperties)}
    if set(d) != names:
        raise ValueError("TensorProperties fields differ")
    return TensorProperties(**{k: _dec_value(v) for k, v in d.items()})


def _enc_wire(w: wire.WirePlan | None) -> Any:
    if w is None:
        return None
    if w.raw:
        raise _NotStorable("an item the compact form keeps as an object")
    return {"n": w.n, "blob": base64.b64encode(w.blob).decode(), "props": [_enc_props(wire.props_object(p)) for p in w.props]}


def _dec_wire(d: Any) -> wire.WirePlan | None:
    if d is None:
        return None
    return wire.WirePlan(
        n=int(d["n"]), blob=wire.check_blob(base64.b64decode(d["blob"])), props=tuple(_dec_props(p) for p in d["props"])
    )


# ---------------------------------------------------------------- plans and metadata
def _enc_final(plan: SavePlan) -> Any:
    msg = plan.planner_data
    if plan.items or plan.storage_data is not None:
        raise _NotStorable("a final plan that is not compact")
    if msg is None:
        return None
    if not isinstance(msg, wire.FinalMsg) or msg.planner_data is not None:
        raise _NotStorable("a final plan with planner data")
    return {"n": msg.n, "blob": base64.b64encode(msg.blob).decode(), "extra": _enc_wire(msg.extra)}


def _dec_final(d: Any) -> SavePlan:
    if d is None:
        return SavePlan([])
    msg = wire.FinalMsg(
        planner_data=None, n=int(d["n"]), blob=wire.check_blob(base64.b64decode(d["blob"])), extra=_dec_wire(d["extra"])
    )
    return SavePlan([], planner_data=msg)


def _enc_metadata(md: Metadata) -> Any:
    fresh = Metadata(state_dict_metadata={})
    for f in dataclasses.fields(md):
        if f.name not in ("state_dict_metadata", "planner_data") and getattr(md, f.name) != getattr(fresh, f.name):
            raise _NotStorable(f"metadata field {f.name}")
    sdm: dict[str, Any] = {}
    for fqn, m in md.state_dict_metadata.items():
        if isinstance(m, compat.BytesStorageMetadata) and type(m) is compat.BytesStorageMetadata:
            sdm[fqn] = None
            continue
        if type(m) is not compat.TensorStorageMetadata:
            raise _NotStorable(f"storage metadata of type {type(m).__name__}")
        chunks = []
        for c in m.chunks:
            if type(c) is not ChunkStorageMetadata:
                raise _NotStorable("a chunk type")
            chunks.append([*c.offsets, *c.sizes])
        sdm[fqn] = {"props": _enc_props(m.properties), "size": list(m.size), "chunks": chunks}
    pd = md.planner_data
    mapping = None
    if pd is not None:
        if not isinstance(pd, dict):
            raise _NotStorable("planner data")
        mapping = {}
        for k, path in pd.items():
            if type(k) is not str or type(path) is not tuple or not all(type(x) in (str, int) for x in path):
                raise _NotStorable("a flattening mapping entry")
            mapping[k] = [[type(x).__name__, x] for x in path]
    return {"sdm": sdm, "mapping": mapping}


def _dec_metadata(d: Any) -> Metadata:
    sdm: dict[str, Any] = {}
    for fqn, m in d["sdm"].items():
        if m is None:
            sdm[fqn] = compat.BytesStorageMetadata()
            continue
        nd = len(m["size"])
        chunks = [
            ChunkStorageMetadata(offsets=torch.Size(c[:nd]), sizes=torch.Size(c[nd:])) for c in m["chunks"]
        ]
        if any(len(c) != 2 * nd for c in m["chunks"]):
            raise ValueError("chunk rank differs from tensor rank")
        sdm[fqn] = compat.TensorStorageMetadata(
            properties=_dec_props(m["props"]), size=torch.Size(m["size"]), chunks=chunks
        )
    md = Metadata(state_dict_metadata=sdm)
    if d["mapping"] is not None:
        mapping = {k: tuple(int(x) if t == "int" else str(x) for t, x in path) for k, path in d["mapping"].items()}
        md = dataclasses.replace(md, planner_data=mapping)
    return md


# ---------------------------------------------------------------- the store
def _versions() -> dict[str, Any]:
    import dcplan

    return {
        "format": FORMAT,
        "dcplan": getattr(dcplan, "__version__", "?"),
        "torch": torch.__version__,
        "wire": wire.WIRE_VERSION,
    }


@attrs.define
class PlanStore:
    """The coordinator's view of ``plan_cache_dir`` for one planner.

    :param path: the directory.
    :param slot: what a stored plan must share with this save besides the
        digests (see the module docstring), as text; hashed into the file name.
    """

    path: str
    slot: str
    #: after :meth:`check`: the entry that matched, for :meth:`replay`
    hit: tuple[list[SavePlan], Metadata] | None = None
    outcome: str | None = None
    #: every rank's exchange digest of this save (set by :func:`dcplan.save.exchange.send_plan`)
    digests: list[bytes] | None = None

    @classmethod
    def for_planner(cls, planner: Any) -> PlanStore | None:
        directory = planner.config.plan_cache_dir
        if not directory or planner.config.plan_cache:
            return None
        from dcplan.save.cache import default_namespace

        kls = type(planner)
        slot = json.dumps(
            {
                "ns": default_namespace(planner),
                "planner": f"{kls.__module__}.{kls.__qualname__}",
                "agreement": repr(planner.agreement()),
                "config": sorted((k, repr(v)) for k, v in planner.config.to_dict().items()),
                "flatten": [bool(planner.flatten_state_dict), bool(planner.flatten_sharded_tensors)],
                **_versions(),
            },
            sort_keys=True,
        )
        return cls(path=str(directory), slot=slot)

    def file(self, world: int) -> str:
        h = hashlib.blake2b(f"{self.slot}|{world}".encode(), digest_size=12).hexdigest()
        return os.path.join(self.path, f"dcplan-plan-{world}-{h}.json.z")

    # -- coordinator, before the gather --------------------------------------
    def check(self, digests: Sequence[bytes]) -> bool:
        """Whether the stored entry matches every rank's digest (remembered for :meth:`replay`)."""
        self.hit = None
        name = self.file(len(digests))
        why = self._load(name, digests)
        if why is None:
            self.outcome = "hit"
            log.info("dcplan plan store: reusing the plan stored in %s", name)
            return True
        self.outcome = "miss"
        log.info("dcplan plan store: planning from scratch: %s", why)
        return False

    def _load(self, name: str, digests: Sequence[bytes]) -> str | None:
        try:
            with open(name, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return f"no stored plan for this layout yet ({name})"
        except OSError as exc:
            return f"cannot read {name}: {exc}"
        try:
            doc = json.loads(zlib.decompress(raw).decode("utf-8"))
            if doc.get("versions") != _versions():
                return f"{name} was written by another version ({doc.get('versions')} vs {_versions()})"
            if doc.get("slot") != self.slot:
                return f"{name} belongs to another configuration"
            stored = [bytes.fromhex(d) for d in doc["digests"]]
            if len(stored) != len(digests):
                return f"{name} is for {len(stored)} ranks, this save has {len(digests)}"
            changed = [r for r, (a, b) in enumerate(zip(stored, digests)) if a != b]
            if changed:
                return f"the plans of rank(s) {changed[:8]}{'...' if len(changed) > 8 else ''} changed"
            finals = [_dec_final(p) for p in doc["finals"]]
            if len(finals) != len(digests):
                return f"{name} is damaged (plan count)"
            self.hit = (finals, _dec_metadata(doc["metadata"]))
        except (ValueError, KeyError, TypeError, AttributeError, zlib.error, UnicodeDecodeError) as exc:
            return f"{name} is corrupt ({type(exc).__name__}: {exc})"
        return None

    # -- coordinator, in create_global_plan ---------------------------------
    def replay(self) -> tuple[list[SavePlan], Metadata]:
        if self.hit is None:
            from dcplan.errors import PlanMismatchError

            raise PlanMismatchError(
                "dcplan plan store: ranks sent stored-plan markers but the coordinator holds no stored plan; "
                "the planner's process group differs from the one dcp.save uses"
            )
        finals, md = self.hit
        self.hit = None
        return [compat.replace_plan(p) for p in finals], md

    def record(self, digests: Sequence[bytes] | None, finals: Sequence[SavePlan], metadata: Metadata) -> None:
        """Store a successful plan (never raises: a plan that cannot be stored is only logged)."""
        if digests is None or len(digests) != len(finals):
            return
        try:
            doc = {
                "versions": _versions(),
                "slot": self.slot,
                "digests": [d.hex() for d in digests],
                "finals": [_enc_final(p) for p in finals],
                "metadata": _enc_metadata(metadata),
            }
        except _NotStorable as exc:
            log.info("dcplan plan store: this plan is not stored (%s)", exc)
            return
        name = self.file(len(digests))
        try:
            os.makedirs(self.path, exist_ok=True)
            data = zlib.compress(json.dumps(doc, separators=(",", ":")).encode("utf-8"), 6)
            fd, tmp = tempfile.mkstemp(dir=self.path, prefix=".dcplan-plan-", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, name)
            except BaseException:
                with _suppress():
                    os.unlink(tmp)
                raise
        except OSError as exc:
            log.warning("dcplan plan store: cannot write %s: %s", name, exc)


def _suppress() -> Any:
    import contextlib

    return contextlib.suppress(OSError)
