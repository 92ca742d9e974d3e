"""The model store's `index.json`: written only whole (temp file, fsync, rename, fsync the directory),
read back checked, and moved aside with one warning line when it does not read back (README: a corrupt
state file does not keep the agent down)."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from agent.errors import LeptonError
from agent.statefiles import Corrupt, fsync_dir, open_or_quarantine

INDEX_VERSION = 1


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data`: temp file, fsync, rename, fsync the directory."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)  # a half-written temp file on a full disk holds the space it needs
        raise
    fsync_dir(path.parent)


def read_index(path: Path) -> dict[str, Any]:
    """The index at `path` (empty when there is none); a corrupt one is moved aside and a new one started."""
    if not path.exists():
        return _empty_index()
    index = open_or_quarantine(
        path, lambda: _load_index(path), what="model store index",
        lost="lost: which delivered versions were active, previous and on trial, and the pending "
             "deployments; pipelines run their configured models (deploy again; the model files in "
             "objects/ go at the next clean-up)")
    if not path.exists():  # moved aside: the new, empty index is what the store now says
        with contextlib.suppress(OSError):  # a full disk: written at the first change that can be
            write_atomic(path, json.dumps(index, indent=1, sort_keys=True).encode())
    return index


def _load_index(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        return _empty_index()
    except OSError as exc:
        raise LeptonError(f"{path}: cannot read the model index ({exc.strerror})") from None
    except ValueError as exc:
        # Written only by rename of a fsynced file, so this is outside damage.
        raise Corrupt(f"not JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("v") != INDEX_VERSION:
        raise Corrupt("not a model index of version 1")
    data.setdefault("models", {})
    data.setdefault("pending", {})
    _check_index(data)
    return data


def _empty_index() -> dict[str, Any]:
    return {"v": INDEX_VERSION, "models": {}, "pending": {}}


def _check_index(data: dict[str, Any]) -> None:
    """Raise Corrupt unless every entry has the shape `_set_slot` and `set_pending` write."""
    models, pending = data["models"], data["pending"]
    if not isinstance(models, dict) or not isinstance(pending, dict):
        raise Corrupt("models and pending must be objects")
    for name, slot in models.items():
        if not isinstance(slot, dict):
            raise Corrupt(f"models.{name} is not an object")
        for key in ("active", "previous", "trial"):
            entry = slot.get(key)
            if entry is None:
                continue
            if not (isinstance(entry, dict) and all(isinstance(entry.get(k), str) for k in
                                                    ("name", "sha256", "manifest_sha256"))
                    and isinstance(entry.get("version"), int | str) and not isinstance(entry.get("version"), bool)):
                raise Corrupt(f"models.{name}.{key} is not a stored model")
    for key, request in pending.items():
        if not isinstance(request, dict):
            raise Corrupt(f"pending.{key} is not an object")
