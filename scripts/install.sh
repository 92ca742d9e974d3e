#!/usr/bin/env bash
# Install the Lepton Edge Agent on Raspberry Pi OS (Bookworm and later) or Debian. Idempotent.
#
#   sudo scripts/install.sh [--wheel dist/lepton_agent-*.whl]   # /opt/lepton, /etc/lepton, the unit started
#   scripts/install.sh --prefix DIR --confdir DIR --no-systemd     # e.g. CI, into a temp dir
#   sudo scripts/install.sh --uninstall [--purge]  # remove what it added; --purge also config, state and user
#   scripts/install.sh --prefix DIR --print-unit   # print the systemd unit as it would be installed, and exit
#
# What runs on the device is a wheel, as tested: --wheel FILE (CI passes the one it tested), else one built
# from this checkout first. A fresh install ends with the agent running, announcing itself and waiting for
# its first deployment (the config written is docs/agent.device.toml: no pipelines, no trusted key).
# Options: --wheel FILE, --prefix DIR (default /opt/lepton), --confdir DIR (default /etc/lepton), --statedir DIR
# (default /var/lib/lepton: what --purge removes; systemd's StateDirectory= makes it),
# --backend auto|litert|tflite (default auto: the wheel's own runtime, ai-edge-litert where it ships; where it
# does not, tflite-runtime; tflite: tflite-runtime beside it, chosen by LEPTON_BACKEND in a unit drop-in),
# --no-systemd (no user, no unit), --no-apt (skip apt-get), --uninstall, --purge (with --uninstall), --print-unit.
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
WHEEL=
UNIT_DIR=/etc/systemd/system
SRC=$(cd "$(dirname "$0")/.." && pwd)

die() { echo "install.sh: $*" >&2; exit 2; }

while [ $# -gt 0 ]; do
  case "$1" in
    --wheel) [ $# -ge 2 ] || die "--wheel needs a .whl file"; WHEEL=$2; shift 2 ;;
    --prefix) [ $# -ge 2 ] || die "--prefix needs a directory"; PREFIX=$2; shift 2 ;;
    --confdir) [ $# -ge 2 ] || die "--confdir needs a directory"; CONFDIR=$2; shift 2 ;;
    --statedir) [ $# -ge 2 ] || die "--statedir needs a directory"; STATEDIR=$2; shift 2 ;;
    --backend) [ $# -ge 2 ] || die "--backend needs auto, litert or tflite"; BACKEND=$2; shift 2 ;;
    --no-systemd) SYSTEMD=0; shift ;;
    --no-apt) APT=0; shift ;;
    --uninstall) UNINSTALL=1; shift ;;
    --purge) PURGE=1; shift ;;
    --print-unit) PRINT_UNIT=1; shift ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done
case "$BACKEND" in auto|litert|tflite) ;; *) die "--backend must be auto, litert or tflite, not $BACKEND" ;; esac
case "$PREFIX" in /*) ;; *) PREFIX=$(pwd)/$PREFIX ;; esac
case "$CONFDIR" in /*) ;; *) CONFDIR=$(pwd)/$CONFDIR ;; esac
# Before anything is touched: --purge alone used to fall through to a full install.
[ "$PURGE" = 0 ] || [ "$UNINSTALL" = 1 ] || die "--purge goes with --uninstall (sudo scripts/install.sh --uninstall --purge)"
if [ -n "$WHEEL" ]; then
  case "$WHEEL" in *.whl) ;; *) die "--wheel $WHEEL: not a .whl file" ;; esac
  [ -f "$WHEEL" ] || die "--wheel $WHEEL: no such file"
  case "$WHEEL" in /*) ;; *) WHEEL=$(pwd)/$WHEEL ;; esac
fi

# The unit for this prefix (the wheel carries its device profiles: nothing else to point at).
render_unit() {
  sed -e "s#/opt/lepton/venv/bin/lepton-agent#$PREFIX/venv/bin/lepton-agent#" \
      -e "s#file:/opt/lepton/share/README.md#file:$PREFIX/share/README.md#" \
      -e "s#/etc/lepton/agent.toml#$CONFDIR/agent.toml#" \
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
    if systemd_running; then systemctl daemon-reload; systemctl reset-failed lepton-agent.service 2>/dev/null || true; fi
    say "removed the systemd unit"
  fi
  rm -rf "$PREFIX"
  say "removed $PREFIX"
  if [ "$PURGE" = 1 ]; then
    rm -rf "$CONFDIR" "$STATEDIR"
    say "purged $CONFDIR and $STATEDIR"
    if [ "$SYSTEMD" = 1 ]; then
      # /var/log/lepton: made by the LogsDirectory= of earlier units (the agent logs to the journal).
      [ ! -d /var/log/lepton ] || { need_root "removing /var/log/lepton"; rm -rf /var/log/lepton; }
      if id lepton >/dev/null 2>&1; then
        need_root "removing the lepton user"
        userdel lepton
        say "removed system user lepton"
      fi
    fi
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
py=$PREFIX/venv/bin/python
pip=("$py" -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" --upgrade pip >/dev/null
if [ -z "$WHEEL" ]; then
  say "building the wheel from $SRC"
  build=$(mktemp -d)
  trap 'rm -rf "$build"' EXIT
  # From a copy: setuptools builds in the tree, and root-owned build/ folders in a user's checkout get in the way.
  # Caches and build output stay behind: other processes (a test run beside it) may be rewriting them.
  mkdir "$build/src"
  tar -C "$SRC" --exclude=./.git --exclude='./.venv*' --exclude=./.cache --exclude=./build --exclude=./dist \
      --exclude='*.egg-info' --exclude=__pycache__ --exclude=./.hypothesis --exclude='./.*_cache' \
      -cf - . | tar -C "$build/src" -xf -
  "$py" -m pip wheel --quiet --disable-pip-version-check --no-deps --wheel-dir "$build" "$build/src" >/dev/null
  WHEEL=$(ls "$build"/lepton_agent-*.whl)
fi
has_litert() { "$py" -c 'import ai_edge_litert.interpreter' 2>/dev/null; }
extra=$BACKEND
say "installing $(basename "$WHEEL")"
case "$BACKEND" in
  auto) "${pip[@]}" "$WHEEL"; has_litert || extra=tflite ;;
  litert) "${pip[@]}" "$WHEEL[litert]" ;;
esac
if [ "$extra" = tflite ]; then
  say "installing the tflite-runtime lane"
  "${pip[@]}" "$WHEEL[tflite]" \
    || die "no LiteRT runtime for $(uname -m) with $("$py" -V): neither ai-edge-litert nor tflite-runtime 2.14 has a wheel"
fi
# The same version number may hold other code than last time: the agent itself always replaced.
"${pip[@]}" --force-reinstall --no-deps "$WHEEL"
# The lane the unit will run (its backend.conf drop-in below says the same).
if [ "$BACKEND" = tflite ]; then export LEPTON_BACKEND=tflite-runtime; fi
say "$("$PREFIX/venv/bin/lepton-agent" --version)"
cp "$SRC/README.md" "$PREFIX/share/README.md"
rm -rf "$PREFIX/share/firmware_profiles"  # copied there by earlier installers; the wheel carries them now

# 3. Configuration: written from the template only when absent, never overwritten.
mkdir -p "$CONFDIR"
fresh=0
if [ -e "$CONFDIR/agent.toml" ]; then
  say "kept existing $CONFDIR/agent.toml"
else
  template="$SRC/docs/agent.device.toml"
  [ -f "$template" ] || die "missing template $template"
  install -m 0640 "$template" "$CONFDIR/agent.toml"
  fresh=1
  say "wrote $CONFDIR/agent.toml (set the broker, and trust your release key before the first deployment)"
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
  # MemoryMax= from the board's profile when the agent can tell it: a drop-in's MemoryMax= comes after the
  # unit's and replaces it, so the profile's budget wins over the unit's 512M (1024M on generic-x86_64).
  # Only our own drop-ins are replaced: an operator's (e.g. Environment=LEPTON_BROKER=…) survive a re-install.
  mkdir -p "$UNIT_DIR/lepton-agent.service.d"
  rm -f "$UNIT_DIR/lepton-agent.service.d/memory.conf" "$UNIT_DIR/lepton-agent.service.d/backend.conf"
  mem=$("$PREFIX/venv/bin/lepton-agent" profile --config "$CONFDIR/agent.toml" \
        --format json 2>/dev/null \
        | "$PREFIX/venv/bin/python" -c 'import json,sys; print(round(json.load(sys.stdin)["memory_budget_mb"]))' \
        2>/dev/null || true)
  if [ -n "$mem" ]; then
    printf '[Service]\nMemoryMax=%sM\n' "$mem" > "$UNIT_DIR/lepton-agent.service.d/memory.conf"
  fi
  if [ "$BACKEND" = tflite ]; then
    printf '[Service]\nEnvironment=LEPTON_BACKEND=tflite-runtime\n' > "$UNIT_DIR/lepton-agent.service.d/backend.conf"
  fi
  if systemd_running; then
    systemctl daemon-reload
    # A restart, not just a start: a re-install must run the agent it just installed.
    systemctl enable lepton-agent.service
    systemctl reset-failed lepton-agent.service 2>/dev/null || true
    if ! systemctl restart lepton-agent.service; then
      echo "install.sh: lepton-agent did not start; its last lines:" >&2
      journalctl -u lepton-agent.service -n 5 --no-pager -o cat >&2 || true
      exit 1
    fi
    waiting=; [ "$fresh" = 0 ] || waiting=", waiting for its first deployment"
    say "lepton-agent running$waiting: systemctl status lepton-agent; journalctl -u lepton-agent -f"
  else
    say "systemd is not running here: unit installed, start it at boot"
  fi
fi
say "installed: $PREFIX/venv/bin/lepton-agent (config $CONFDIR/agent.toml)"
