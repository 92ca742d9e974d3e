"""The signed delivery manifest and every check a device makes before it uses any payload.

`check_manifest()` runs the checks in a fixed order and stops at the first that
fails, naming it with a `Reason`: parse (size, UTF-8, JSON, duplicate keys, NaN),
signature present, key trusted, signature valid, schema, the name@version asked
for, expiry, runtime/board/agent constraints, version newer than the active one
(unless an explicit rollback), declared size within the profile's cap. Nothing is
interpreted before the signature is verified except what is needed to find the key.
"""

from __future__ import annotations

import hashlib
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from agent import __version__
from agent.delivery.reasons import DeliveryError, Reason
from agent.delivery.signing import TrustedKeys, verify
from agent.manifest import Manifest
from agent.mqtt import wire
from agent.version import Version, version_key

MAX_MANIFEST_BYTES = 1 << 20
"""A manifest bigger than this is refused unparsed (a 1 GB model at 64 KiB chunks needs ~1 MB)."""

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
"""Model names travel in topics: no `/`, `+`, `#` or spaces."""
@dataclass(frozen=True)
class DevicePolicy:
    """What this device accepts: its runtime, its board, and the profile's size cap."""

    backend: str
    """The interpreter this agent runs (`ai-edge-litert`, `tflite-runtime`, …)."""
    board: str | None = None
    """The profile class (`pi-4b`, `generic-x86_64`, …); None: unknown, board constraints refuse."""
    max_model_bytes: int = 64 * 1024 * 1024
    """The profile's cap on a model file."""
    agent_version: str = __version__
    clock: Callable[[], float] = field(default=time.time, compare=False)
    """Wall clock for expiry checks (tests pass a fixed one)."""


@dataclass(frozen=True)
class SignedManifest:
    """A manifest that passed every check: the raw bytes as received and what they say."""

    raw: bytes
    manifest: Manifest

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> Version:
        return self.manifest.version

    @property
    def sha256(self) -> str:
        assert self.manifest.sha256 is not None
        return self.manifest.sha256

    @property
    def size(self) -> int:
        assert self.manifest.size is not None
        return self.manifest.size

    @property
    def chunk_size(self) -> int:
        assert self.manifest.delivery is not None
        return self.manifest.delivery.chunk_size

    @property
    def chunks(self) -> tuple[str, ...]:
        assert self.manifest.delivery is not None
        return self.manifest.delivery.chunks

    @property
    def raw_sha256(self) -> str:
        return hashlib.sha256(self.raw).hexdigest()

    def chunk_span(self, index: int) -> tuple[int, int]:
        """(offset, length) of chunk `index` in the file."""
        offset = index * self.chunk_size
        return offset, min(self.chunk_size, self.size - offset)


def parse_json_object(raw: bytes, what: str = "manifest") -> dict[str, Any]:
    """Parse hostile JSON into a dict; DeliveryError(BAD_MANIFEST) for anything odd."""
    try:
        return wire.decode(raw, MAX_MANIFEST_BYTES, what)
    except wire.WireError as exc:
        raise DeliveryError(Reason.BAD_MANIFEST, exc.message) from None


def check_manifest(
    raw: bytes,
    trusted: TrustedKeys,
    policy: DevicePolicy,
    *,
    active: Version | None = None,
    rollback: bool = False,
    expect_name: str | None = None,
    expect_version: Version | None = None,
) -> SignedManifest:
    """Every check, in order; the first that fails raises DeliveryError with its reason."""
    data = parse_json_object(raw)
    kid, signature = data.get("key_id"), data.get("signature")
    if not isinstance(signature, str) or not signature or not isinstance(kid, str) or not kid:
        raise DeliveryError(Reason.UNSIGNED, "the manifest has no signature or no key_id")
    public = trusted.get(kid)
    if public is None:
        raise DeliveryError(Reason.UNTRUSTED_KEY, f"key {kid!r} is not in trusted_keys")
    try:
        good = verify(data, public)
    except ValueError:  # a float the canonical form refuses (it would not have been signable)
        good = False
    if not good:
        raise DeliveryError(Reason.BAD_SIGNATURE, f"the signature does not verify with key {kid}")
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or "manifest"
        raise DeliveryError(Reason.BAD_MANIFEST, f"{loc}: {err['msg']}") from None
    _check_consistent(manifest)
    if expect_name is not None and manifest.name != expect_name:
        raise DeliveryError(Reason.WRONG_MODEL, f"asked for {expect_name!r}, the manifest is for {manifest.name!r}")
    if expect_version is not None and version_key(manifest.version) != version_key(expect_version):
        raise DeliveryError(Reason.WRONG_MODEL,
                            f"asked for version {expect_version}, the manifest is {manifest.version}")
    assert manifest.delivery is not None and manifest.size is not None
    expires = manifest.delivery.expires
    now = policy.clock()
    if expires is not None and expires <= now:
        raise DeliveryError(Reason.EXPIRED, f"the manifest expired {now - expires:.0f} s ago")
    _check_runtime(manifest, policy)
    if active is not None and not rollback and version_key(manifest.version) <= version_key(active):
        raise DeliveryError(Reason.NOT_NEWER, f"version {manifest.version} is not newer than the active {active}")
    if manifest.size > policy.max_model_bytes:
        raise DeliveryError(Reason.TOO_LARGE,
                            f"{manifest.size} bytes is over this profile's cap of {policy.max_model_bytes}")
    return SignedManifest(raw=raw, manifest=manifest)


def _check_consistent(m: Manifest) -> None:
    """A signed manifest can still be malformed; these make the download well defined."""
    if not NAME_RE.match(m.name):
        raise DeliveryError(Reason.BAD_MANIFEST, f"name {m.name!r} cannot be a topic level")
    try:
        version_key(m.version)
    except ValueError as exc:
        raise DeliveryError(Reason.BAD_MANIFEST, f"version: {exc}") from None
    if m.delivery is None or m.sha256 is None or m.size is None:
        raise DeliveryError(Reason.BAD_MANIFEST, "a delivery manifest needs sha256, size and delivery")
    if not isinstance(m.labels, list | None):
        raise DeliveryError(Reason.BAD_MANIFEST, "labels: a delivered manifest carries its labels as a list")
    expected = math.ceil(m.size / m.delivery.chunk_size)
    if len(m.delivery.chunks) != expected:
        raise DeliveryError(Reason.BAD_MANIFEST,
                            f"delivery.chunks: {len(m.delivery.chunks)} hashes for {expected} chunks of {m.size} bytes")


def _check_runtime(m: Manifest, policy: DevicePolicy) -> None:
    rt = m.runtime
    if rt.backends and policy.backend not in rt.backends:
        raise DeliveryError(Reason.INCOMPATIBLE,
                            f"runtime.backends is {list(rt.backends)}, this agent runs {policy.backend}")
    if rt.boards and policy.board not in rt.boards:
        raise DeliveryError(Reason.INCOMPATIBLE, f"runtime.boards is {list(rt.boards)}, this board is {policy.board}")
    if rt.min_agent is not None:
        try:
            too_old = version_key(rt.min_agent) > version_key(policy.agent_version)
        except ValueError:
            raise DeliveryError(Reason.BAD_MANIFEST, f"runtime.min_agent {rt.min_agent!r} is not semver") from None
        if too_old:
            raise DeliveryError(Reason.INCOMPATIBLE,
                                f"runtime.min_agent is {rt.min_agent}, this agent is {policy.agent_version}")
