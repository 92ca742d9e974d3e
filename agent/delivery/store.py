"""The content-addressed model store on the device.

Layout under the store root (`<state dir>/models`):

    objects/<sha256>.tflite          model files, named by the sha256 of their bytes
    objects/<sha256>.manifest.json   the signed manifests as received, named by their own sha256
    partial/<sha256>.part            a download in progress (resumed after a restart)
    partial/<sha256>.manifest.json   its signed manifest, so the partial file can be re-checked
    index.json                       per model name: active, previous (last known good), trial;
                                     and the deployments still pending

A file enters `objects/` only by `rename()` of a fully written, fsynced file whose
hash was checked, followed by an fsync of the directory; the index is replaced
the same way. So after a crash at any instant `objects/` holds only complete,
correct files and the index names the old or the new state, never a mix. Sender
given file names are never used. The active and the previous model of each name
are kept (last known good); `gc()` removes the rest.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from agent.delivery import failpoints
from agent.delivery.index import fsync_dir, read_index, write_atomic
from agent.delivery.reasons import DeliveryError, Reason
from agent.delivery.signed_manifest import SignedManifest
from agent.errors import LeptonError
from agent.version import Version, version_key

logger = logging.getLogger(__name__)

_COPY_BLOCK = 1 << 16


@dataclass(frozen=True)
class StoredModel:
    """One model version held in the store."""

    name: str
    version: Version
    sha256: str
    """Of the model file: its name in `objects/`."""
    manifest_sha256: str
    """Of the signed manifest's bytes: its name in `objects/`."""

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "sha256": self.sha256,
                "manifest_sha256": self.manifest_sha256}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StoredModel:
        return cls(str(d["name"]), d["version"], str(d["sha256"]), str(d["manifest_sha256"]))


@dataclass(frozen=True)
class Slot:
    """What the index says about one model name."""

    active: StoredModel | None = None
    previous: StoredModel | None = None
    """The last known good model before the active one; an explicit rollback returns to it."""
    trial: StoredModel | None = None
    """Swapped in and on probation; becomes active only when the probation window passes."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(_COPY_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


class PartFile:
    """A download in progress: chunks written at their offsets, read back to re-check after a restart."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)

    def write_at(self, offset: int, data: bytes | memoryview) -> None:
        failpoints.reach("part.write", part=self, offset=offset, data=data)
        view = memoryview(data)
        while view:
            written = os.pwrite(self.fd, view, offset)
            view, offset = view[written:], offset + written

    def read_at(self, offset: int, length: int) -> bytes:
        return os.pread(self.fd, length, offset)

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def truncate(self, length: int) -> None:
        os.ftruncate(self.fd, length)

    def sync(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class ModelStore:
    """Content-addressed model files plus a small index of active/previous/trial per model name."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.objects = self.root / "objects"
        self.partial = self.root / "partial"
        self._lock = threading.RLock()
        try:
            self.objects.mkdir(parents=True, exist_ok=True)
            self.partial.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LeptonError(f"{self.root}: cannot create the model store ({exc.strerror})") from None
        self._index_path = self.root / "index.json"
        self._dirty = False
        """The index in memory has a change the disk does not (a write failed); `flush()` retries."""
        self._index = self._read_index()
        self._remove_temp_files()

    # -- index ----------------------------------------------------------------

    def _read_index(self) -> dict[str, Any]:
        return read_index(self._index_path)

    def _write_index(self) -> None:
        write_atomic(self._index_path, json.dumps(self._index, indent=1, sort_keys=True).encode())
        if self._dirty:
            logger.warning("model store: %s written again (the disk has room again)", self._index_path)
        self._dirty = False

    @contextlib.contextmanager
    def _change(self, strict: bool = True) -> Iterator[None]:
        """Change the index in the block, then write it. If the write fails (disk full, I/O error): `strict`
        puts the index back and raises DeliveryError(storage), for records that must be on disk before the
        caller acts on them; otherwise the change stands in memory and `flush()` writes it when it can (for
        clean-ups, whose loss a restart repairs: a trial left on disk is rolled back, a pending entry left
        resumes or fails once more)."""
        with self._lock:
            before = copy.deepcopy(self._index)
            yield
            try:
                self._write_index()
            except OSError as exc:
                if strict:
                    self._index = before
                    raise DeliveryError(Reason.STORAGE, f"{self._index_path}: cannot write the index "
                                                        f"({exc.strerror or exc})") from None
                if not self._dirty:
                    logger.warning("model store: cannot write %s (%s); kept in memory, written when it can",
                                   self._index_path, exc.strerror or exc)
                self._dirty = True

    def flush(self) -> bool:
        """Write an index whose last change could not be written; True when the disk has it all."""
        with self._lock:
            if not self._dirty:
                return True
            try:
                self._write_index()
            except OSError:
                return False
            return True

    def _remove_temp_files(self) -> None:
        for folder in (self.root, self.objects, self.partial):
            for tmp in folder.glob(".*.tmp"):
                tmp.unlink(missing_ok=True)

    def slot(self, name: str) -> Slot:
        with self._lock:
            d = self._index["models"].get(name, {})

            def get(key: str) -> StoredModel | None:
                return StoredModel.from_dict(d[key]) if d.get(key) else None

            return Slot(active=get("active"), previous=get("previous"), trial=get("trial"))

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._index["models"])

    def active(self, name: str) -> StoredModel | None:
        return self.slot(name).active

    def kept(self, name: str) -> list[StoredModel]:
        s = self.slot(name)
        return [m for m in (s.active, s.previous) if m is not None]

    def _set_slot(self, name: str, slot: Slot, strict: bool = True) -> None:
        with self._change(strict):
            self._index["models"][name] = {
                key: (getattr(slot, key).as_dict() if getattr(slot, key) else None)
                for key in ("active", "previous", "trial")
            }

    # -- activation records ---------------------------------------------------

    def activate(self, model: StoredModel) -> None:
        """Make `model` active at once (the previous active becomes the last known good)."""
        with self._lock:
            s = self.slot(model.name)
            previous = s.active if s.active is not None and s.active.sha256 != model.sha256 else s.previous
            self._set_slot(model.name, Slot(active=model, previous=previous))

    def begin_trial(self, model: StoredModel) -> None:
        """Record that `model` is swapped in on probation; a restart before `commit_trial` discards it."""
        with self._lock:
            s = self.slot(model.name)
            self._set_slot(model.name, Slot(active=s.active, previous=s.previous, trial=model))

    def commit_trial(self, name: str) -> StoredModel:
        with self._lock:
            s = self.slot(name)
            if s.trial is None:
                raise LeptonError(f"{name}: no model on trial")
            self.activate(s.trial)
            return s.trial

    def abort_trial(self, name: str) -> StoredModel | None:
        """Forget the trial; returns the model that was on it."""
        with self._lock:
            s = self.slot(name)
            if s.trial is not None:
                self._set_slot(name, Slot(active=s.active, previous=s.previous), strict=False)
            return s.trial

    def rollback(self, name: str, version: Version | None = None) -> StoredModel:
        """Make a kept version active again: the previous one, or `version` if this store keeps it."""
        with self._lock:
            s = self.slot(name)
            target = s.previous
            if version is not None:
                target = next((m for m in self.kept(name) if version_key(m.version) == version_key(version)), None)
            if target is None or not self.has_object(target.sha256):
                wanted = f"version {version}" if version is not None else "a previous version"
                raise DeliveryError(Reason.NOT_KEPT, f"{name}: this device does not keep {wanted}")
            previous = s.active if s.active is not None and s.active.sha256 != target.sha256 else s.previous
            self._set_slot(name, Slot(active=target, previous=previous))
            return target

    def deactivate(self, name: str) -> StoredModel | None:
        """Run nothing of `name` from the store (its pipelines go back to the model their config names);
        the active model is kept as the previous one. Returns it."""
        with self._lock:
            s = self.slot(name)
            if s.active is not None:
                self._set_slot(name, Slot(previous=s.active))
            return s.active

    # -- pending deployments (resumed after a restart) --------------------------

    def pending(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {k: dict(v) for k, v in self._index["pending"].items()}

    def set_pending(self, name: str, request: dict[str, Any]) -> None:
        with self._change():
            self._index["pending"][name] = request

    def clear_pending(self, name: str) -> None:
        with self._lock:
            if name in self._index["pending"]:
                with self._change(strict=False):
                    del self._index["pending"][name]

    # -- the self-test marker (a deployment that takes the agent down is not tried again) ---------

    def begin_selftest(self, marker: dict[str, Any]) -> None:
        """Record, durably, that a self-test starts: found at the next start, it means the agent died in it."""
        with self._change():
            self._index["selftest"] = marker

    def end_selftest(self) -> None:
        with self._lock:
            if "selftest" in self._index:
                with self._change(strict=False):
                    del self._index["selftest"]

    def selftest_marker(self) -> dict[str, Any] | None:
        with self._lock:
            marker = self._index.get("selftest")
            return dict(marker) if isinstance(marker, dict) else None

    # -- objects --------------------------------------------------------------

    def path(self, sha256: str) -> Path:
        return self.objects / f"{sha256}.tflite"

    def manifest_path(self, manifest_sha256: str) -> Path:
        return self.objects / f"{manifest_sha256}.manifest.json"

    def has_object(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def verify_object(self, sha256: str) -> bool:
        """Re-hash a stored file (it was checked on entry; this catches damage since)."""
        try:
            return sha256_file(self.path(sha256)) == sha256
        except FileNotFoundError:
            return False

    def manifest_bytes(self, model: StoredModel) -> bytes:
        return self.manifest_path(model.manifest_sha256).read_bytes()

    def _store_manifest(self, signed: SignedManifest) -> str:
        msha = signed.raw_sha256
        target = self.manifest_path(msha)
        if not target.exists():
            write_atomic(target, signed.raw)
        return msha

    def entry(self, signed: SignedManifest) -> StoredModel:
        return StoredModel(signed.name, signed.version, signed.sha256, signed.raw_sha256)

    # -- downloads ------------------------------------------------------------

    def part_path(self, sha256: str) -> Path:
        return self.partial / f"{sha256}.part"

    def open_part(self, signed: SignedManifest) -> PartFile:
        """The partial file for this manifest's model, created or reopened for resuming."""
        with self._lock:
            manifest = self.partial / f"{signed.sha256}.manifest.json"
            if not manifest.exists() or manifest.read_bytes() != signed.raw:
                write_atomic(manifest, signed.raw)
            part = PartFile(self.part_path(signed.sha256))
            if part.size() > signed.size:
                # Never more bytes than declared, whatever an earlier run left there.
                part.truncate(signed.size)
            return part

    def partial_manifest(self, sha256: str) -> bytes | None:
        try:
            return (self.partial / f"{sha256}.manifest.json").read_bytes()
        except FileNotFoundError:
            return None

    def commit(self, signed: SignedManifest, part: PartFile) -> StoredModel:
        """Move a complete, verified partial file into `objects/` (fsync, rename, fsync dir)."""
        with self._lock:
            try:
                part.sync()
                msha = self._store_manifest(signed)
                failpoints.reach("before_rename", sha256=signed.sha256)
                os.replace(part.path, self.path(signed.sha256))
                fsync_dir(self.objects)
                fsync_dir(self.partial)
            except OSError as exc:
                raise DeliveryError(Reason.STORAGE, f"{self.root}: {exc.strerror or exc}") from None
            finally:
                part.close()
            failpoints.reach("after_rename", sha256=signed.sha256)
            (self.partial / f"{signed.sha256}.manifest.json").unlink(missing_ok=True)
            return StoredModel(signed.name, signed.version, signed.sha256, msha)

    def adopt(self, signed: SignedManifest) -> StoredModel:
        """The entry for a model whose file is already in the store (a re-deploy, a resumed activation)."""
        with self._lock:
            msha = self._store_manifest(signed)
            (self.partial / f"{signed.sha256}.manifest.json").unlink(missing_ok=True)
            self.part_path(signed.sha256).unlink(missing_ok=True)
            return StoredModel(signed.name, signed.version, signed.sha256, msha)

    def discard_part(self, sha256: str) -> None:
        with self._lock:
            self.part_path(sha256).unlink(missing_ok=True)
            (self.partial / f"{sha256}.manifest.json").unlink(missing_ok=True)

    def import_file(self, source: Path | BinaryIO, signed: SignedManifest) -> StoredModel:
        """Copy a model from a local file (first boot, tests), hashing while copying."""
        with self._lock:
            part = self.open_part(signed)
            part.truncate(0)
            digest, offset = hashlib.sha256(), 0
            with _opened(source) as fh:
                for block in iter(lambda: fh.read(_COPY_BLOCK), b""):
                    if offset + len(block) > signed.size:
                        part.close()
                        self.discard_part(signed.sha256)
                        raise DeliveryError(Reason.SIZE_MISMATCH, f"more than the declared {signed.size} bytes")
                    part.write_at(offset, block)
                    digest.update(block)
                    offset += len(block)
            if offset != signed.size or digest.hexdigest() != signed.sha256:
                part.close()
                self.discard_part(signed.sha256)
                raise DeliveryError(Reason.HASH_MISMATCH, "the file does not match the manifest's size and sha256")
            return self.commit(signed, part)

    # -- housekeeping ----------------------------------------------------------

    def gc(self) -> list[Path]:
        """Remove objects no index entry names, and partial files no pending deployment needs."""
        with self._lock:
            keep: set[str] = set()
            for name in self._index["models"]:
                s = self.slot(name)
                for m in (s.active, s.previous, s.trial):
                    if m is not None:
                        keep.update({f"{m.sha256}.tflite", f"{m.manifest_sha256}.manifest.json"})
            pending_shas = {str(p.get("sha256")) for p in self._index["pending"].values()}
            removed = []
            for path in self.objects.iterdir():
                if path.name not in keep:
                    path.unlink(missing_ok=True)
                    removed.append(path)
            for path in self.partial.iterdir():
                if path.name.split(".", 1)[0] not in pending_shas:
                    path.unlink(missing_ok=True)
                    removed.append(path)
            return removed


@contextlib.contextmanager
def _opened(source: Path | BinaryIO) -> Iterator[BinaryIO]:
    if isinstance(source, Path):
        with source.open("rb") as fh:
            yield fh
    else:
        yield source
