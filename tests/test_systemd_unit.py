"""The systemd unit passes `systemd-analyze verify` and its offline security exposure stays ≤ 2.0."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "lepton-agent.service"

pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")


def _rendered(tmp_path: Path) -> Path:
    # Rendered by install.sh itself for a prefix; ExecStart must name an executable that exists for verify.
    agent = Path(sys.executable).parent / "lepton-agent"
    assert agent.exists()
    prefix = tmp_path / "prefix"
    (prefix / "venv" / "bin").mkdir(parents=True)
    (prefix / "venv" / "bin" / "lepton-agent").symlink_to(agent)
    r = subprocess.run(["bash", str(UNIT.parent.parent / "scripts" / "install.sh"), "--prefix", str(prefix),
                        "--print-unit"], capture_output=True, text=True, timeout=60, check=True)
    path = tmp_path / "lepton-agent.service"
    path.write_text(r.stdout)
    return path


def test_unit_verifies(tmp_path: Path) -> None:
    r = subprocess.run(["systemd-analyze", "verify", str(_rendered(tmp_path))],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    assert "lepton-agent.service" not in r.stderr, r.stderr  # no warnings about our unit


def test_security_exposure_at_most_2(tmp_path: Path) -> None:
    r = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--no-pager", str(_rendered(tmp_path))],
                       capture_output=True, text=True, timeout=60, check=False)
    m = re.search(r"Overall exposure level for lepton-agent\.service: (\d+\.\d+)", r.stdout)
    assert m, r.stdout + r.stderr
    assert float(m.group(1)) <= 2.0, r.stdout


def test_unit_contract() -> None:
    text = UNIT.read_text()
    for line in ("Type=notify", "Restart=on-failure", "StartLimitBurst=", "WatchdogSec=", "ProtectSystem=strict",
                 "ProtectHome=yes", "PrivateTmp=yes", "NoNewPrivileges=yes", "CapabilityBoundingSet=\n",
                 "DeviceAllow=char-video4linux rw", "DeviceAllow=char-alsa rw", "SupplementaryGroups=video audio",
                 "StateDirectory=lepton", "ConfigurationDirectory=lepton", "MemoryMax=",
                 # A bad config (exit 2) is not restarted: it would use up StartLimitBurst (issue 17).
                 "RestartPreventExitStatus=2\n"):
        assert line in text, line
    assert "PrivateDevices=yes" not in text
    assert "LogsDirectory=" not in text  # the agent logs to the journal; /var/log/lepton stayed empty
