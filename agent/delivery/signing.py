"""Ed25519 signatures over a canonical JSON manifest, and the trusted keys a device checks them with.

The signed bytes are the manifest without its `signature` field, serialised
canonically: keys sorted, no insignificant whitespace, UTF-8 (no `\\u` escapes for
non-ASCII), numbers as Python writes them (shortest round-trip; NaN and infinities
refused). Publisher and device both re-serialise a parsed object, so the bytes on
the wire may be pretty-printed or reordered without breaking the signature, and
`key_id` is inside the signed bytes, so it cannot be swapped for another key.

A key id is derived from the public key (`ed25519:` + the first 16 hex digits of
the sha256 of its 32 raw bytes): a config entry whose id does not match its key is
refused at load, so an id can never silently point at another key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent.errors import BadInput

KEY_ID_PREFIX = "ed25519:"


def canonical_json(obj: Mapping[str, Any]) -> bytes:
    """The bytes a signature covers: `obj` without `signature`, canonically serialised."""
    body = {k: v for k, v in obj.items() if k != "signature"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def public_raw(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(key: Ed25519PublicKey) -> str:
    return KEY_ID_PREFIX + hashlib.sha256(public_raw(key)).hexdigest()[:16]


def public_text(key: Ed25519PublicKey) -> str:
    """The public key as the config writes it: base64 of the 32 raw bytes."""
    return base64.b64encode(public_raw(key)).decode()


def sign(obj: Mapping[str, Any], private: Ed25519PrivateKey) -> dict[str, Any]:
    """`obj` with `key_id` set and `signature` (base64) over its canonical form."""
    signed = {k: v for k, v in obj.items() if k != "signature"}
    signed["key_id"] = key_id(private.public_key())
    signed["signature"] = base64.b64encode(private.sign(canonical_json(signed))).decode()
    return signed


def verify(obj: Mapping[str, Any], public: Ed25519PublicKey) -> bool:
    """True when `obj["signature"]` is a valid signature of `obj`'s canonical form by `public`."""
    text = obj.get("signature")
    if not isinstance(text, str):
        return False
    try:
        signature = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return False
    try:
        public.verify(signature, canonical_json(obj))
    except (InvalidSignature, ValueError):
        return False
    return True


@dataclass(frozen=True)
class TrustedKeys:
    """Key id → Ed25519 public key, from the config's `trusted_keys` table."""

    keys: Mapping[str, Ed25519PublicKey]

    @classmethod
    def from_config(cls, table: Mapping[str, str], where: str = "trusted_keys") -> TrustedKeys:
        """Parse `{key_id: base64 raw public key}`; BadInput naming the entry on any problem."""
        keys: dict[str, Ed25519PublicKey] = {}
        for kid, text in table.items():
            field = f"{where}.{kid}"
            try:
                raw = base64.b64decode(text, validate=True)
                public = Ed25519PublicKey.from_public_bytes(raw)
            except (binascii.Error, ValueError, TypeError):
                raise BadInput(f"{field}: not a base64 Ed25519 public key (32 raw bytes)") from None
            if key_id(public) != kid:
                raise BadInput(f"{field}: the id does not match the key (its id is {key_id(public)})")
            keys[kid] = public
        return cls(keys)

    def get(self, kid: str) -> Ed25519PublicKey | None:
        return self.keys.get(kid)


# -- key files (operator side) ---------------------------------------------------


def generate_key_file(path: Path) -> Ed25519PrivateKey:
    """A new private key written to `path` (PKCS#8 PEM, mode 0600, never overwriting) and `path`.pub."""
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    try:
        # O_EXCL: an existing key is never overwritten; 0600 from the first byte, not chmod after.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise BadInput(f"{path}: already exists; not overwriting a key") from None
    except OSError as exc:
        raise BadInput(f"{path}: cannot create key file ({exc.strerror})") from None
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    public = private.public_key()
    pub_pem = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    Path(f"{path}.pub").write_bytes(pub_pem)
    return private


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise BadInput(f"{path}: no such key file") from None
    except OSError as exc:
        raise BadInput(f"{path}: cannot read key file ({exc.strerror})") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise BadInput(f"{path}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise BadInput(f"{path}: not an Ed25519 key")
    return key
