# Shared set-up for scripts/test and scripts/demo: idempotent, fast when everything is there.

PYTHON=${PYTHON:-python3}

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

ensure_mosquitto() {
  command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] && return 0
  echo "installing mosquitto (apt-get)" >&2
  as_root apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq mosquitto mosquitto-clients >/dev/null
  # The package enables a system broker on :1883; tests and the demo start their own.
  as_root systemctl disable --now mosquitto >/dev/null 2>&1 || true
}

# Debian's prometheus package: promtool checks the agent's /metrics, and the tests start a server that scrapes it.
ensure_promtool() {
  command -v promtool >/dev/null 2>&1 && return 0
  echo "installing prometheus for promtool (apt-get)" >&2
  as_root apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  # The tests start their own server; the package's would otherwise run on :9090 for good.
  as_root systemctl disable --now prometheus >/dev/null 2>&1 || true
}

# Debian's Chromium: the dashboard tests drive the real page in it headless (Playwright with executable_path, so
# Playwright's own browser download is never needed).
ensure_chromium() {
  [ -x /usr/bin/chromium ] && return 0
  echo "installing chromium (apt-get)" >&2
  as_root apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends chromium >/dev/null
}

# RabbitMQ (tests/test_brokers.py runs a two-node cluster of it); the tests run the server binary themselves.
ensure_rabbitmq() {
  [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] && return 0
  echo "installing rabbitmq-server (apt-get)" >&2
  as_root apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq rabbitmq-server >/dev/null
  as_root systemctl disable --now rabbitmq-server epmd.socket epmd.service >/dev/null 2>&1 || true
}

# arecord (alsa-utils) and PortAudio: the tests capture from a real ALSA device (a file-backed PCM).
ensure_audio_tools() {
  command -v arecord >/dev/null 2>&1 && ldconfig -p 2>/dev/null | grep libportaudio >/dev/null && return 0
  echo "installing alsa-utils and libportaudio2 (apt-get)" >&2
  as_root apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq alsa-utils libportaudio2 >/dev/null
}

# GStreamer's RTSP server through the system Python's GObject bindings, with an H.264 encoder (x264 in
# plugins-ugly): the RTSP tests serve a real camera stream with it (tests/rtsp_server.py).
ensure_rtsp_server() {
  /usr/bin/python3 -c "import gi; gi.require_version('GstRtspServer', '1.0'); gi.require_version('Gst', '1.0');
from gi.repository import Gst; Gst.init(None); assert Gst.ElementFactory.find('x264enc')" >/dev/null 2>&1 && return 0
  echo "installing the GStreamer RTSP server (apt-get)" >&2
  as_root apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends python3-gi \
    gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-plugins-ugly >/dev/null
}

# ensure_venv DIR LANE: a venv with the agent installed for that runtime lane.
ensure_venv() {
  local dir=$1 lane=$2 stamp want
  want=$(cat pyproject.toml scripts/lib.sh | sha256sum | cut -c1-16)-$lane
  stamp=$dir/.lepton-stamp
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then return 0; fi
  echo "preparing $dir (lane $lane)" >&2
  [ -x "$dir/bin/python" ] || "$PYTHON" -m venv "$dir"
  local pip=("$dir/bin/python" -m pip install --quiet --disable-pip-version-check)
  "${pip[@]}" --upgrade pip >/dev/null
  if [ "$lane" = tflite ]; then
    "${pip[@]}" -e ".[tflite,test]" "numpy<2" "opencv-python-headless<4.11"
  else
    "${pip[@]}" -e ".[litert,test,dev,compress,audio]"
  fi
  echo "$want" > "$stamp"
}
