"""A real RTSP camera for the tests and scripts/bench_rtsp.py: GStreamer's gst-rtsp-server serving H.264.

Runs under the *system* Python (`/usr/bin/python3` with python3-gi and gir1.2-gst-rtsp-server-1.0,
installed by scripts/lib.sh `ensure_rtsp_server`), never in the agent's venv:

    /usr/bin/python3 tests/rtsp_server.py --port P --clip FILE.i420 [--user U --password-file F] [--transport tcp|udp]

FILE.i420 holds raw 640x480 I420 frames (the test renders real photos into it); they are pushed
at 15 fps, looping, like a camera: live, timestamped when pushed. Each frame carries its push
time (Unix ms, 40 bits) as a row of black/white 16x16 blocks along its top edge (`STAMP_*`), so a
client can tell the age of any frame it decodes. The stream is `rtsp://127.0.0.1:P/cam`, behind
Basic auth when --user is given (the password is read from a file, never from the command line).
Prints `ready` once listening; stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
gi.require_version("GstRtsp", "1.0")
from gi.repository import GLib, Gst, GstRtsp, GstRtspServer  # noqa: E402

WIDTH, HEIGHT, FPS = 640, 480, 15
FRAME_BYTES = WIDTH * HEIGHT * 3 // 2
STAMP_BITS, STAMP_BLOCK = 40, 16


def stamp(frame: bytearray, ms: int) -> None:
    """Write `ms` as STAMP_BITS blocks (most significant first, white = 1) into the Y plane's top rows."""
    for bit in range(STAMP_BITS):
        value = b"\xeb" * STAMP_BLOCK if (ms >> (STAMP_BITS - 1 - bit)) & 1 else b"\x10" * STAMP_BLOCK
        x = bit * STAMP_BLOCK
        for y in range(STAMP_BLOCK):
            at = y * WIDTH + x
            frame[at:at + STAMP_BLOCK] = value


class Camera:
    def __init__(self, clip: bytes) -> None:
        self.frames = [clip[i:i + FRAME_BYTES] for i in range(0, len(clip) - FRAME_BYTES + 1, FRAME_BYTES)]
        self.index = 0
        self.appsrc: Gst.Element | None = None

    def configure(self, factory: GstRtspServer.RTSPMediaFactory, media: GstRtspServer.RTSPMedia) -> None:
        self.appsrc = media.get_element().get_child_by_name("cam")

    def push(self) -> bool:
        src = self.appsrc
        if src is not None:
            frame = bytearray(self.frames[self.index % len(self.frames)])
            self.index += 1
            stamp(frame, int(time.time() * 1000))
            if src.emit("push-buffer", Gst.Buffer.new_wrapped(bytes(frame))) != Gst.FlowReturn.OK:
                self.appsrc = None  # the media was torn down (last client left); a new one configures again
        return True


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--clip", required=True)
    ap.add_argument("--user")
    ap.add_argument("--password-file")
    ap.add_argument("--transport", choices=("tcp", "udp", "any"), default="any",
                    help="the only lower transport offered (a client asking for the other one fails)")
    args = ap.parse_args()
    Gst.init(None)
    with open(args.clip, "rb") as f:
        camera = Camera(f.read())

    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(str(args.port))
    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_launch(
        f"( appsrc name=cam is-live=true do-timestamp=true format=time "
        f"caps=video/x-raw,format=I420,width={WIDTH},height={HEIGHT},framerate={FPS}/1 ! queue max-size-buffers=2 "
        "leaky=downstream ! x264enc tune=zerolatency speed-preset=ultrafast key-int-max=15 bitrate=1500 "
        "! video/x-h264,profile=baseline ! rtph264pay name=pay0 pt=96 config-interval=1 )")
    factory.set_shared(True)
    lower = {"tcp": GstRtsp.RTSPLowerTrans.TCP, "udp": GstRtsp.RTSPLowerTrans.UDP,
             "any": GstRtsp.RTSPLowerTrans.TCP | GstRtsp.RTSPLowerTrans.UDP}[args.transport]
    factory.set_protocols(lower)
    factory.connect("media-configure", camera.configure)
    if args.user:
        with open(args.password_file, encoding="utf-8") as f:
            password = f.read().strip()
        auth = GstRtspServer.RTSPAuth()
        token = GstRtspServer.RTSPToken()
        token.set_string(GstRtspServer.RTSP_TOKEN_MEDIA_FACTORY_ROLE, "user")
        auth.add_basic(GstRtspServer.RTSPAuth.make_basic(args.user, password), token)
        server.set_auth(auth)
        permissions = GstRtspServer.RTSPPermissions()
        permissions.add_role_from_structure(Gst.Structure.new_from_string(
            "user, media.factory.access=(boolean)true, media.factory.construct=(boolean)true"))
        factory.set_permissions(permissions)
    server.get_mount_points().add_factory("/cam", factory)
    if server.attach(None) == 0:
        print(f"cannot listen on 127.0.0.1:{args.port}", file=sys.stderr)
        return 1

    loop = GLib.MainLoop()
    GLib.timeout_add(1000 // FPS, camera.push)
    GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, signal.SIGTERM, loop.quit)
    print("ready", flush=True)
    loop.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
