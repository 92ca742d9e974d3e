"""scripts/install.sh into a temporary prefix: the wheel installed (not the checkout), a fresh config that
runs, idempotent, config never overwritten, unit rendered and verified, --uninstall keeps config unless
--purge, and --purge alone refused. (Under a real systemd: scripts/test-systemd.)"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "install.sh"

pytestmark = pytest.mark.skipif(
    os.environ.get("LEPTON_BACKEND") == "tflite-runtime",
    reason="the installer builds its own venv; one lane is enough (it runs in the ai-edge-litert lane)",
)


def _clean_env() -> dict[str, str]:
    # As on a device: nothing points into this checkout.
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LEPTON_PROFILES_DIR")}


def _install(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=900, check=False,
                          env=_clean_env())


def test_install_is_idempotent_keeps_config_and_uninstalls(tmp_path: Path) -> None:
    prefix, confdir = tmp_path / "opt", tmp_path / "etc"
    args = ("--prefix", str(prefix), "--confdir", str(confdir), "--statedir", str(tmp_path / "state"),
            "--no-systemd", "--no-apt")
    first = _install(*args)
    assert first.returncode == 0, first.stdout + first.stderr
    agent = prefix / "venv" / "bin" / "lepton-agent"
    version = subprocess.run([str(agent), "--version"], capture_output=True, text=True, timeout=60, check=False)
    assert version.returncode == 0 and version.stdout.startswith("lepton-agent ") and "(backend " in version.stdout
    # The wheel, not an editable checkout: the package and its profiles live in the venv.
    python = prefix / "venv" / "bin" / "python"
    code = "import agent.profiles as p; print(p.__file__); print(p.profiles_dir())"
    where = subprocess.run([str(python), "-c", code],
                           capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path,
                           env=_clean_env())
    module, profiles = where.stdout.splitlines()
    assert module.startswith(str(prefix / "venv")) and profiles.startswith(str(prefix / "venv")), where.stdout
    assert not (prefix / "share" / "firmware_profiles").exists()
    config = confdir / "agent.toml"
    assert config.read_text() == (ROOT / "docs" / "agent.device.toml").read_text()
    assert config.stat().st_mode & 0o777 == 0o640
    # The written config is valid as is: no fixture paths, no pipelines yet, no trusted key.
    checked = subprocess.run([str(agent), "check-config", "--config", str(config)], capture_output=True, text=True,
                             timeout=60, check=False, cwd=tmp_path, env=_clean_env())
    assert checked.returncode == 0, checked.stderr
    effective = json.loads(checked.stdout)
    assert effective["pipelines"] == [] and effective["trusted_keys"] == {}
    if platform.machine() == "x86_64":
        assert effective["profile"]["name"] == "generic-x86_64"
    config.write_text(config.read_text() + "\n# edited by the operator\n")
    edited = config.read_text()

    unit = prefix / "share" / "lepton-agent.service"
    text = unit.read_text()
    assert f"ExecStart={agent} run --config {config}" in text
    if shutil.which("systemd-analyze"):
        verify = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True,
                                timeout=60, check=False)
        assert verify.returncode == 0, verify.stderr
        security = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--no-pager", str(unit)],
                                  capture_output=True, text=True, timeout=60, check=False)
        m = re.search(r"Overall exposure level for lepton-agent\.service: (\d+\.\d+)", security.stdout)
        assert m and float(m.group(1)) <= 2.0, security.stdout

    second = _install(*args)  # idempotent: nothing breaks, the operator's config stays
    assert second.returncode == 0, second.stderr
    assert "kept existing" in second.stdout and config.read_text() == edited

    removed = _install(*args, "--uninstall")
    assert removed.returncode == 0, removed.stderr
    assert not prefix.exists() and config.read_text() == edited
    purged = _install(*args, "--uninstall", "--purge")
    assert purged.returncode == 0 and not confdir.exists()


@pytest.mark.parametrize(("args", "message"), [
    (("--backend", "onnx"), "--backend must be auto, litert or tflite"),
    (("--frobnicate",), "unknown option --frobnicate"),
    (("--wheel", "/nonexistent/nothing.whl"), "--wheel /nonexistent/nothing.whl: no such file"),
])
def test_bad_options_exit_2(args: tuple[str, ...], message: str) -> None:
    r = _install(*args)
    assert r.returncode == 2 and message in r.stderr


def test_purge_alone_is_refused_and_installs_nothing(tmp_path: Path) -> None:
    # --purge alone used to perform a full install.
    prefix = tmp_path / "opt"
    r = _install("--purge", "--prefix", str(prefix), "--confdir", str(tmp_path / "etc"), "--no-systemd", "--no-apt")
    assert r.returncode == 2 and "--purge goes with --uninstall" in r.stderr
    assert not prefix.exists() and not (tmp_path / "etc").exists()
