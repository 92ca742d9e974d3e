#!/usr/bin/env bash
# A side venv with Home Assistant itself (HA_VERSION), for tests/ha_check.py: the tests validate our MQTT
# discovery configs with Home Assistant's own schema and render our templates with its own template engine.
# Idempotent and quick once built (a stamp); prints the venv's python. Built in about 35 s, ~430 MB.
# Home Assistant's own package_constraints.txt (from its wheel) pins its dependencies: without it pip
# resolves 2024-era open ranges against today's index and builds sdists for minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
HA_VERSION=2024.3.3
PAHO_VERSION=1.6.1  # what homeassistant 2024.3's mqtt component requires (its manifest.json)
dir=${HA_VENV:-.cache/ha-venv}
want="homeassistant==$HA_VERSION paho-mqtt==$PAHO_VERSION"
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
"${pip[@]}" install -c "$tmp/constraints.txt" "$tmp"/homeassistant-*.whl "paho-mqtt==$PAHO_VERSION" >&2
echo "$want" > "$dir/.stamp"
echo "$dir/bin/python"
