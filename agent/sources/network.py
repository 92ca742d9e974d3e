"""Network streams (IP cameras): `rtsp://`, `rtsps://`, `rtmp://`, `http://`, `https://` through OpenCV's FFmpeg.

Open and read timeouts (`timeout`) make a stalled stream noticed, closed and reopened instead of
hanging the loop. `transport` picks RTSP over TCP or UDP. The credentials may come from the
options (`username`, `password_file` or `password_env`, as `[mqtt.auth]` does) instead of the URI,
so that the password is in neither the config nor anything the agent shows: the source's `name`
and `uri` never carry it; only the URL handed to FFmpeg does.

When FFmpeg cannot open an RTSP stream it does not say why; one plain RTSP `DESCRIBE` then tells
a refused or unreachable camera from a wrong password (401) or a wrong path (404).
"""

from __future__ import annotations

import base64
import logging
import os
import socket
import threading
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from agent.credentials import read_secret
from agent.errors import BadInput
from agent.sources.camera import OpenCVDevice, _quiet_cv2
from agent.sources.capture import Device, DeviceError, LiveSource, redact
from agent.sources.source import register_source

logger = logging.getLogger(__name__)

STREAM_SCHEMES = frozenset({"rtsp", "rtsps", "rtmp", "http", "https"})
FFMPEG_OPTIONS_ENV = "OPENCV_FFMPEG_CAPTURE_OPTIONS"
"""OpenCV reads FFmpeg's options from this variable when it opens a stream (`key;value|key;value`)."""

# The transport reaches FFmpeg only through the environment, which is the process's: opens that
# set it take turns (an agent opens its cameras rarely; a camera that is down answers fast or
# times out within `timeout`).
_open_lock = threading.Lock()


def with_credentials(uri: str, username: str | None, password: str | None) -> str:
    """`uri` with `username:password@` (percent-encoded) in its authority; BadInput when they clash."""
    parts = urlsplit(uri)
    hostport = parts.netloc.rpartition("@")[2]
    if password is not None and parts.password is not None:
        raise BadInput(f"{redact(uri)}: the URI has a password already; drop it from the URI (better) or "
                       "the password_file/password_env option")
    if username is not None and parts.username is not None:
        raise BadInput(f"{redact(uri)}: the user name is both in the URI and the username option")
    user = username if username is not None else (unquote(parts.username) if parts.username else None)
    if password is not None and user is None:
        raise BadInput(f"{redact(uri)}: a password needs a user name (user@ in the URI, or the username option)")
    if user is None:
        return uri
    secret = password if password is not None else (unquote(parts.password) if parts.password else None)
    cred = quote(user, safe="") + ("" if secret is None else ":" + quote(secret, safe=""))
    return urlunsplit(parts._replace(netloc=f"{cred}@{hostport}"))


def ffmpeg_options(current: str | None, transport: str) -> str:
    """The variable's value with `rtsp_transport` set to `transport`, other options kept."""
    kept = [o for o in (current or "").split("|") if o and not o.startswith("rtsp_transport;")]
    return "|".join([*kept, f"rtsp_transport;{transport}"])


def rtsp_diagnosis(url: str, timeout: float) -> tuple[str, bool]:
    """Why an RTSP URL does not open, from one DESCRIBE: (one-line reason, whether retrying can fix it)."""
    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port or 554
    where = f"{host}:{port}"
    bare = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    lines = [f"DESCRIBE {bare} RTSP/1.0", "CSeq: 1", "Accept: application/sdp", "User-Agent: lepton-agent"]
    if parts.username is not None:
        token = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
        lines.append("Authorization: Basic " + base64.b64encode(token).decode())
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
            head = sock.recv(4096).decode("latin-1")
    except ConnectionRefusedError:
        return f"connection refused by {where} (camera down, or no RTSP server on that port)", False
    except TimeoutError:
        return f"{where} does not answer within {timeout:g} s (unreachable or down)", False
    except OSError as exc:
        return f"cannot reach {where} ({exc.strerror or exc})", False
    status = head.split("\r\n", 1)[0].split(" ")
    code = status[1] if len(status) > 1 and status[0].startswith("RTSP/") else ""
    if code == "401":
        if parts.username is None:
            return "the camera asks for a user name and password (401)", True
        if "basic" not in head.lower():
            # Our probe only speaks Basic; a Digest camera refuses it whatever the password. FFmpeg did answer
            # its challenge, so the password is still the likeliest cause.
            return "authorisation failed: wrong user name or password (401, Digest)", True
        return "authorisation failed: wrong user name or password (401)", True
    if code == "404":
        return f"no such stream on {where} (404: check the path)", True
    if code == "200":
        return "the camera answers but the stream does not open (not video, or an unsupported codec)", False
    return f"the camera refuses the stream ({' '.join(status[1:]) or 'no RTSP answer'})", False


def network_source(uri: str) -> bool:
    """Whether `uri` names a network stream (this module's kind)."""
    return "://" in uri and uri.split("://", 1)[0].lower() in STREAM_SCHEMES


@register_source(network_source)
class NetworkStream(LiveSource):
    """An RTSP/RTMP/HTTP(S) video stream through FFmpeg; a stall past `timeout` reopens it."""

    def __init__(self, uri: str, options: dict[str, Any] | None = None) -> None:
        super().__init__(uri, options)
        s = self.settings
        self.scheme = uri.split("://", 1)[0].lower()
        if s.transport is not None and self.scheme not in ("rtsp", "rtsps"):
            raise BadInput(f"{self.name}: source option transport applies to rtsp:// streams only")
        password = read_secret(s.password_file, s.password_env, "source option ")
        self._url = with_credentials(uri, s.username, password)
        """What FFmpeg opens: the only place the password is kept."""
        if s.username is not None:
            self.name = redact(with_credentials(uri, s.username, None))

    def connect(self) -> Device:
        cv2 = _quiet_cv2()
        ms = round(self.settings.timeout * 1000)
        params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, ms]
        if self.settings.decode_threads is not None:
            params += [cv2.CAP_PROP_N_THREADS, self.settings.decode_threads]
        transport = self.settings.transport
        with _open_lock:
            before = os.environ.get(FFMPEG_OPTIONS_ENV)
            if transport is not None:
                os.environ[FFMPEG_OPTIONS_ENV] = ffmpeg_options(before, transport)
            try:
                cap = cv2.VideoCapture(self._url, cv2.CAP_FFMPEG, params)
            finally:
                if before is None:
                    os.environ.pop(FFMPEG_OPTIONS_ENV, None)
                else:
                    os.environ[FFMPEG_OPTIONS_ENV] = before
        if not cap.isOpened():
            cap.release()
            if self.scheme == "rtsp":
                # Short: FFmpeg has already waited up to `timeout`; this only tells why.
                reason, lasting = rtsp_diagnosis(self._url, min(self.settings.timeout, 2.0))
                raise DeviceError(f"cannot open stream: {reason}", lasting=lasting)
            raise DeviceError("cannot open stream (unreachable, refused, or not video)")
        logger.info("%s: open (%s)", self.name, transport or "default transport")
        return OpenCVDevice(cap)
