"""Broker credentials and TLS for every MQTT client of the project (the agent's link and the operator tools)."""

from __future__ import annotations

import ssl
import stat
from pathlib import Path

from agent.config import MqttSection
from agent.credentials import read_secret
from agent.errors import BadInput


def read_password(auth_file: Path | None, env_name: str | None, env: dict[str, str] | None = None) -> str | None:
    """The broker password from its file (first line) or variable; BadInput names where it was looked for."""
    return read_secret(auth_file, env_name, "mqtt.auth.", env)


def tls_context(settings: MqttSection) -> ssl.SSLContext:
    """A client context trusting only the pinned CA (or the system store), with the client pair if given."""
    tls = settings.tls
    return client_context(tls.ca_file, tls.cert_file, tls.key_file)


def client_context(ca_file: Path | None, cert_file: Path | None, key_file: Path | None) -> ssl.SSLContext:
    """`tls_context` from the three files (the operator tools take them as options)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        if ca_file is not None:
            ctx.load_verify_locations(cafile=str(ca_file))
        else:
            ctx.load_default_certs()
    except (OSError, ssl.SSLError) as exc:
        raise BadInput(f"mqtt.tls.ca_file: {ca_file}: cannot load ({exc})") from None
    if cert_file is not None and key_file is not None:
        check_key_file(key_file)
        try:
            ctx.load_cert_chain(str(cert_file), str(key_file))
        except (OSError, ssl.SSLError) as exc:
            raise BadInput(f"mqtt.tls.cert_file: {cert_file}: cannot load with its key ({exc})") from None
    return ctx


def check_key_file(path: Path) -> None:
    """Refuse a private key that group or others may read."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise BadInput(f"mqtt.tls.key_file: {path}: cannot read ({exc.strerror})") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise BadInput(
            f"mqtt.tls.key_file: {path}: readable by others (mode {stat.S_IMODE(mode):04o}); chmod 600 it"
        )
