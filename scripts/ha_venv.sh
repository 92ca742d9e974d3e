#!/usr/bin/env bash
# A side venv with Home Assistant itself (HA_VERSION), for tests/ha_check.py (our MQTT discovery configs through
# its own schema, our templates through its own template engine) and tests/ha_instance.py (a running instance).
# Idempotent and quick once built (a stamp); prints the venv's python. Built in about 35 s, ~430 MB.
# Home Assistant's own package_constraints.txt (from its wheel) pins its dependencies: without it pip
# resolves 2024-era open ranges against today's index and builds sdists for minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
HA_VERSION=2024.3.3
# What its mqtt integration and the file_upload one it depends on require (their manifest.json files):
# tests/ha_instance.py runs Home Assistant with the MQTT integration loaded.
EXTRA="paho-mqtt==1.6.1 janus==1.0.0"
dir=${HA_VENV:-.cache/ha-venv}
want="homeassistant==$HA_VERSION $EXTRA"
# One builder at a time (the suite's xdist workers and both lanes call this): the others wait, then find the stamp.
mkdir -p "$(dirname "$dir")"
exec 9>"$dir.lock"
flock 9
if [ -f "$dir/.stamp" ] && [ "$(cat "$dir/.stamp")" = "$want" ]; then echo "$dir/bin/python"; exit 0; fi
echo "preparing $dir ($want)" >&2
rm -rf "$dir"
"${PYTHON:-python3}" -m venv "$dir"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
pip=("$dir/bin/python" -m pip --disable-pip-version-check -q)
"${pip[@]}" download --no-deps -d "$tmp" "homeassistant==$HA_VERSION" >&2
"$dir/bin/python" - "$tmp" <<'PY' > "$tmp/constraints.txt"
import pathlib, sys, zipfile
wheel = next(pathlib.Path(sys.argv[1]).glob("homeassistant-*.whl"))
text = zipfile.ZipFile(wheel).read("homeassistant/package_constraints.txt").decode()
print("\n".join(line for line in text.splitlines() if "==" in line and not line.startswith("#")))
PY
# shellcheck disable=SC2086  # EXTRA is a list of requirements
"${pip[@]}" install -c "$tmp/constraints.txt" "$tmp"/homeassistant-*.whl $EXTRA >&2
echo "$want" > "$dir/.stamp"
echo "$dir/bin/python"
