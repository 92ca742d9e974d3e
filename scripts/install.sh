#!/usr/bin/env bash
# Install the Lepton Edge Agent on Raspberry Pi OS (Bookworm and later) or Debian. Idempotent.
#
#   sudo scripts/install.sh                       # /opt/lepton, /etc/lepton, systemd unit enabled and started
#   scripts/install.sh --prefix DIR --confdir DIR --no-systemd     # e.g. CI, into a temp dir
#   sudo scripts/install.sh --uninstall [--purge]  # remove what it added; --purge also config and state
#   scripts/install.sh --prefix DIR --print-unit   # print the systemd unit as it would be installed, and exit
#
# Options: --prefix DIR (default /opt/lepton), --confdir DIR (default /etc/lepton), --statedir DIR
# (default /var/lib/lepton: what --purge removes; systemd's StateDirectory= makes it),
# --backend auto|litert|tflite (default auto: ai-edge-litert where a wheel exists, else tflite-runtime),
# --no-systemd (no user, no unit), --no-apt (skip apt-get), --uninstall, --purge, --print-unit.
set -euo pipefail

PREFIX=/opt/lepton
CONFDIR=/etc/lepton
STATEDIR=/var/lib/lepton
BACKEND=auto
SYSTEMD=1
APT=1
UNINSTALL=0
PURGE=0
PRINT_UNIT=0
UNIT_DIR=/etc/systemd/system
SRC=$(cd "$(dirname "$0")/.." && pwd)

die() { echo "install.sh: $*" >&2; exit 2; }

while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) [ $# -ge 2 ] || die "--prefix needs a directory"; PREFIX=$2; shift 2 ;;
    --confdir) [ $# -ge 2 ] || die "--confdir needs a directory"; CONFDIR=$2; shift 2 ;;
    --statedir) [ $# -ge 2 ] || die "--statedir needs a directory"; STATEDIR=$2; shift 2 ;;
    --backend) [ $# -ge 2 ] || die "--backend needs auto, litert or tflite"; BACKEND=$2; shift 2 ;;
    --no-systemd) SYSTEMD=0; shift ;;
    --no-apt) APT=0; shift ;;
    --uninstall) UNINSTALL=1; shift ;;
    --purge) PURGE=1; shift ;;
    --print-unit) PRINT_UNIT=1; shift ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done
case "$BACKEND" in auto|litert|tflite) ;; *) die "--backend must be auto, litert or tflite, not $BACKEND" ;; esac
case "$PREFIX" in /*) ;; *) PREFIX=$(pwd)/$PREFIX ;; esac
case "$CONFDIR" in /*) ;; *) CONFDIR=$(pwd)/$CONFDIR ;; esac

PROFILES=$PREFIX/share/firmware_profiles

# The unit for this prefix: paths rewritten, and the profiles the non-editable install cannot find
# beside its package pointed at.
render_unit() {
  sed -e "s#/opt/lepton/venv/bin/lepton-agent#$PREFIX/venv/bin/lepton-agent#" \
      -e "s#file:/opt/lepton/share/README.md#file:$PREFIX/share/README.md#" \
      -e "s#/etc/lepton/agent.toml#$CONFDIR/agent.toml#" \
      -e "s#^Environment=LEPTON_STATE_DIR=.*#&\\nEnvironment=LEPTON_PROFILES_DIR=$PROFILES#" \
      "$SRC/systemd/lepton-agent.service"
}
if [ "$PRINT_UNIT" = 1 ]; then render_unit; exit 0; fi

systemd_running() { [ "$SYSTEMD" = 1 ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null; }
need_root() { [ "$(id -u)" = 0 ] || die "$1 needs root (run with sudo)"; }
say() { echo "==> $*"; }

if [ "$UNINSTALL" = 1 ]; then
  if [ "$SYSTEMD" = 1 ] && [ -f "$UNIT_DIR/lepton-agent.service" ]; then
    need_root "removing the systemd unit"
    if systemd_running; then systemctl disable --now lepton-agent.service >/dev/null 2>&1 || true; fi
    rm -f "$UNIT_DIR/lepton-agent.service"
    rm -rf "$UNIT_DIR/lepton-agent.service.d"
    if systemd_running; then systemctl daemon-reload; fi
    say "removed the systemd unit"
  fi
  rm -rf "$PREFIX"
  say "removed $PREFIX"
  if [ "$PURGE" = 1 ]; then
    rm -rf "$CONFDIR" "$STATEDIR"
    say "purged $CONFDIR and $STATEDIR"
  else
    say "kept configuration in $CONFDIR and state in $STATEDIR (--purge removes them)"
  fi
  exit 0
fi

# 1. System packages: Python with venv, arecord for microphones without PortAudio.
if [ "$APT" = 1 ]; then
  missing=()
  command -v python3 >/dev/null || missing+=(python3)
  python3 -c "import venv, ensurepip" 2>/dev/null || missing+=(python3-venv)
  command -v arecord >/dev/null || missing+=(alsa-utils)
  if [ ${#missing[@]} -gt 0 ]; then
    need_root "installing ${missing[*]}"
    say "apt-get install ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
fi
python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' || die "Python 3.11 or newer is needed"

# 2. The venv and the agent.
mkdir -p "$PREFIX" "$PREFIX/share"
if [ ! -x "$PREFIX/venv/bin/python" ]; then
  say "creating $PREFIX/venv"
  python3 -m venv "$PREFIX/venv"
fi
pip=("$PREFIX/venv/bin/python" -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" --upgrade pip >/dev/null
extra=$BACKEND
if [ "$BACKEND" = auto ]; then
  if "$PREFIX/venv/bin/python" -m pip download --quiet --no-deps -d "$PREFIX/share/.probe" ai-edge-litert >/dev/null 2>&1
  then extra=litert; else extra=tflite; fi
  rm -rf "$PREFIX/share/.probe"
fi
say "installing the agent ($extra runtime)"
if [ "$extra" = tflite ]; then
  "${pip[@]}" "$SRC[tflite]" "numpy<2" "opencv-python-headless<4.11"
else
  "${pip[@]}" "$SRC[litert]"
fi
"$PREFIX/venv/bin/lepton-agent" --version >/dev/null
cp "$SRC/README.md" "$PREFIX/share/README.md"
# The device profiles: a non-editable install has no source tree to find them in.
rm -rf "$PROFILES"
mkdir -p "$PROFILES"
cp -R "$SRC/firmware_profiles/." "$PROFILES/"

# 3. Configuration: written from the template only when absent, never overwritten.
mkdir -p "$CONFDIR"
if [ -e "$CONFDIR/agent.toml" ]; then
  say "kept existing $CONFDIR/agent.toml"
else
  template="$SRC/docs/agent.example.toml"
  [ -f "$template" ] || die "missing template $template"
  install -m 0640 "$template" "$CONFDIR/agent.toml"
  say "wrote $CONFDIR/agent.toml (edit device id, broker and keys)"
fi

# 4. The unit, rendered for this prefix; the user; enabled and started when systemd runs.
render_unit > "$PREFIX/share/lepton-agent.service"
if [ "$SYSTEMD" = 1 ]; then
  need_root "installing the systemd unit"
  if ! id lepton >/dev/null 2>&1; then
    useradd --system --no-create-home --home-dir "$STATEDIR" --shell /usr/sbin/nologin lepton
    say "created system user lepton"
  fi
  for g in video audio; do getent group "$g" >/dev/null && usermod -a -G "$g" lepton; done
  chown root:lepton "$CONFDIR" "$CONFDIR/agent.toml"
  chmod 0750 "$CONFDIR"
  install -m 0644 "$PREFIX/share/lepton-agent.service" "$UNIT_DIR/lepton-agent.service"
  # MemoryMax= from the board's profile when the agent can tell it.
  mem=$(LEPTON_PROFILES_DIR=$PROFILES "$PREFIX/venv/bin/lepton-agent" profile --config "$CONFDIR/agent.toml" \
        --format json 2>/dev/null \
        | "$PREFIX/venv/bin/python" -c 'import json,sys; print(round(json.load(sys.stdin)["memory_budget_mb"]))' \
        2>/dev/null || true)
  if [ -n "$mem" ]; then
    mkdir -p "$UNIT_DIR/lepton-agent.service.d"
    printf '[Service]\nMemoryMax=%sM\n' "$mem" > "$UNIT_DIR/lepton-agent.service.d/memory.conf"
  fi
  if systemd_running; then
    systemctl daemon-reload
    systemctl enable --now lepton-agent.service
    say "lepton-agent enabled and started: systemctl status lepton-agent; journalctl -u lepton-agent -f"
  else
    say "systemd is not running here: unit installed, start it at boot"
  fi
fi
say "installed: $PREFIX/venv/bin/lepton-agent (config $CONFDIR/agent.toml)"
