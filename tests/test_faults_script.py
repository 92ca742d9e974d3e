"""scripts/faults.py tidies after itself: a scenario that passed leaves no folder behind, one that failed keeps
its folder (the agent's log, its spool, the broker's) and says where on stderr; --keep keeps every one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

SMALL = ["--n", "50", "--rate", "60", "--keepalive", "2", "--outage", "0", "--finish-timeout", "60"]


def faults(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TMPDIR": str(tmp), "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "faults.py"), *SMALL, *args], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=240, check=False)


@pytest.mark.slow
@pytest.mark.parametrize("keep", [False, True])
def test_a_passed_scenario_leaves_its_folder_only_with_keep(tmp_path: Path, keep: bool) -> None:
    r = faults(tmp_path, "--only", "proxy_reset", *(["--keep"] if keep else []))
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["scenarios"][0]["lost"] == 0
    left = sorted(tmp_path.glob("faults-proxy_reset-*"))
    if keep:
        assert len(left) == 1 and (left[0] / "agent.log").is_file()
        assert f"faults: proxy_reset: its folder is kept: {left[0]}" in r.stderr.splitlines()
    else:
        assert left == [] and "kept" not in r.stderr


@pytest.mark.slow
def test_a_failed_scenario_keeps_its_folder_and_says_where(tmp_path: Path) -> None:
    """The overflow scenario with 50 results cannot overflow the smallest spool cap: faults.py calls that a
    failure (the scenario did not show what it is for)."""
    r = faults(tmp_path, "--only", "spool_overflow")
    assert r.returncode == 1, r.stderr[-2000:]
    assert "never overflowed" in r.stderr
    left = sorted(tmp_path.glob("faults-spool_overflow-*"))
    assert len(left) == 1 and (left[0] / "agent.log").is_file()
    assert f"faults: spool_overflow failed: its folder is kept: {left[0]}" in r.stderr.splitlines()


@pytest.mark.parametrize("bad", [["--keepalive", "1"], ["--rate", "0"], ["--only", "no_such_scenario"]])
def test_bad_arguments_say_so_in_one_line(tmp_path: Path, bad: list[str]) -> None:
    r = faults(tmp_path, *bad)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("faults: ") and list(tmp_path.iterdir()) == []
