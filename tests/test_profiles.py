"""Device profiles: detection from the real model strings of each board, the values, the command, the install."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, run_cli

from agent.config_load import load
from agent.errors import BadInput
from agent.profiles import PROFILES_DIR, available_profiles, cpuinfo_model, detect, load_profile

CLASSES = {"pi-zero-2w", "pi-3b", "pi-4b", "pi-5", "cm4", "generic-arm64", "generic-x86_64"}

# /proc/device-tree/model as the boards write it (NUL-terminated), and the profile each must get.
BOARDS = [
    ("Raspberry Pi Zero 2 W Rev 1.0", "pi-zero-2w"),
    ("Raspberry Pi 3 Model B Rev 1.2", "pi-3b"),
    ("Raspberry Pi 3 Model B Plus Rev 1.3", "pi-3b"),
    ("Raspberry Pi 3 Model A Plus Rev 1.0", "pi-3b"),
    ("Raspberry Pi 4 Model B Rev 1.1", "pi-4b"),
    ("Raspberry Pi 4 Model B Rev 1.4", "pi-4b"),
    ("Raspberry Pi 4 Model B Rev 1.5", "pi-4b"),
    ("Raspberry Pi 400 Rev 1.0", "pi-4b"),
    ("Raspberry Pi Compute Module 4 Rev 1.0", "cm4"),
    ("Raspberry Pi Compute Module 4S Rev 1.0", "cm4"),
    ("Raspberry Pi 5 Model B Rev 1.0", "pi-5"),
    ("Raspberry Pi 5 Model B Rev 1.1", "pi-5"),
    ("Raspberry Pi 500 Rev 1.0", "pi-5"),
    ("Raspberry Pi Compute Module 5 Rev 1.0", "pi-5"),
]

# What a Raspberry Pi 4 kernel writes to /proc/cpuinfo (abridged to the lines that matter).
PI4_CPUINFO = """processor\t: 0
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm crc32 cpuid
CPU implementer\t: 0x41
CPU part\t: 0xd08

Revision\t: c03114
Serial\t\t: 10000000a1b2c3d4
Model\t\t: Raspberry Pi 4 Model B Rev 1.4
"""


def _tree(root: Path, model: str | None = None, cpuinfo: str | None = None) -> Path:
    (root / "proc").mkdir(parents=True, exist_ok=True)
    if model is not None:
        (root / "proc/device-tree").mkdir(parents=True, exist_ok=True)
        (root / "proc/device-tree/model").write_bytes(model.encode() + b"\0")
    if cpuinfo is not None:
        (root / "proc/cpuinfo").write_text(cpuinfo)
    return root


@pytest.mark.parametrize(("model", "expected"), BOARDS)
def test_each_pi_board_gets_its_profile(tmp_path: Path, model: str, expected: str) -> None:
    # A Pi runs 64-bit (aarch64) or 32-bit (armv7l) Raspberry Pi OS: the board decides, not the arch.
    for arch in ("aarch64", "armv7l"):
        found = detect(_tree(tmp_path, model), machine=arch)
        assert found.name == expected, (model, arch, found)
        assert f"device-tree model {model!r}" in found.reason
        assert found.evidence["device_tree_model"] == model


def test_cpuinfo_model_line_when_there_is_no_device_tree(tmp_path: Path) -> None:
    # Containers often see /proc/cpuinfo but not /proc/device-tree.
    assert cpuinfo_model(PI4_CPUINFO) == "Raspberry Pi 4 Model B Rev 1.4"
    found = detect(_tree(tmp_path, cpuinfo=PI4_CPUINFO), machine="aarch64")
    assert found.name == "pi-4b" and "cpuinfo Model" in found.reason


@pytest.mark.parametrize(("arch", "expected"), [("aarch64", "generic-arm64"), ("arm64", "generic-arm64"),
                                                ("x86_64", "generic-x86_64"), ("AMD64", "generic-x86_64")])
def test_generic_boards_by_architecture(tmp_path: Path, arch: str, expected: str) -> None:
    found = detect(_tree(tmp_path, "Radxa ROCK 5B" if "arm" in arch or "aarch" in arch else None), machine=arch)
    assert found.name == expected and f"architecture {arch.lower()}" in found.reason


def test_unknown_board_and_architecture_falls_back_to_the_frugal_profile(tmp_path: Path) -> None:
    found = detect(_tree(tmp_path, "Raspberry Pi Model B Rev 2"), machine="armv6l")  # the first Pi: no profile
    assert found.name == "generic-arm64"
    assert "no profile matches" in found.reason and "armv6l" in found.reason


def test_every_class_is_there_with_sensible_values() -> None:
    assert set(available_profiles()) >= CLASSES
    profiles = {name: load_profile(name) for name in CLASSES}
    for name, p in profiles.items():
        assert p.thermal_soft_c < p.thermal_hard_c, name
        if name.startswith(("pi-", "cm")):
            assert p.thermal_hard_c < 85, name  # pause before the Pi firmware throttles hard at 85 °C
        assert p.camera_width > p.camera_height and p.threads >= 1 and 0 < p.cpu_budget_percent <= 100
        assert p.description and (p.match.device_tree_model or p.match.arch), name
    # Bigger boards afford more: a class ladder, not copies of one file.
    ladder = ["pi-zero-2w", "pi-3b", "pi-4b", "pi-5"]
    for field in ("max_fps", "memory_budget_mb", "max_model_mb", "spool_cap_bytes"):
        values = [getattr(profiles[n], field) for n in ladder]
        assert values == sorted(values) and values[0] < values[-1], field
    latency = [profiles[n].selftest_latency_ms for n in ladder]
    assert latency == sorted(latency, reverse=True)
    assert profiles["pi-zero-2w"].memory_budget_mb < 512  # the board has 512 MB in all


def test_profile_command_text_and_json(tmp_path: Path) -> None:
    root = _tree(tmp_path, "Raspberry Pi 5 Model B Rev 1.0")
    r = run_cli("profile", "--root", str(root), "--format", "json")
    assert r.rc == 0, r.err
    info = json.loads(r.out)
    assert info["profile"] == "pi-5" and info["memory_budget_mb"] == load_profile("pi-5").memory_budget_mb
    assert info["evidence"]["device_tree_model"] == "Raspberry Pi 5 Model B Rev 1.0"
    text = run_cli("profile", "--root", str(root))
    assert text.rc == 0 and text.out.startswith("profile  pi-5")
    assert "device-tree model 'Raspberry Pi 5 Model B Rev 1.0'" in text.out and "memory_budget_mb" in text.out


def test_config_chooses_and_overrides(tmp_path: Path, fixtures: Path) -> None:
    root = _tree(tmp_path / "root", "Raspberry Pi 3 Model B Plus Rev 1.3")
    config = tmp_path / "agent.toml"
    config.write_text(f'[agent]\ndevice_id = "d"\nstate_dir = "{tmp_path}"\n[telemetry]\nroot = "{root}"\n'
                      "[profile]\nmax_fps = 4\ncpu_budget_percent = 50\n")
    eff = load(config, {})
    assert eff.profile.name == "pi-3b" and eff.profile.max_fps == 4 and eff.profile.cpu_budget_percent == 50
    assert "overridden by the config: cpu_budget_percent, max_fps" in eff.profile_reason
    r = run_cli("profile", "--config", str(config), "--format", "json")
    assert r.rc == 0, r.err
    assert json.loads(r.out)["profile"] == "pi-3b" and json.loads(r.out)["max_fps"] == 4
    config.write_text('[agent]\nprofile = "pi-5"\n')
    assert load(config, {}).profile.name == "pi-5" and load(config, {}).profile_reason == "set in the config"


def test_override_that_inverts_the_thermal_limits_is_bad_input(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('[agent]\nprofile = "pi-4b"\n[profile]\nthermal_soft_c = 90\n')
    r = run_cli("check-config", "--config", str(config))
    assert r.rc == 2 and len(r.err_lines) == 1 and "Traceback" not in r.err
    assert str(config) in r.err and "thermal_soft_c (90) must be below thermal_hard_c (80)" in r.err


def test_broken_profile_file_names_file_and_key(tmp_path: Path) -> None:
    folder = tmp_path / "profiles"
    shutil.copytree(PROFILES_DIR, folder)
    (folder / "pi-4b.toml").write_text("turbo = true\n" + (folder / "pi-4b.toml").read_text())
    with pytest.raises(BadInput, match=r"pi-4b.toml: turbo: unknown key"):
        load_profile("pi-4b", folder)
    env = {**os.environ, "LEPTON_PROFILES_DIR": str(folder)}
    r = subprocess.run([sys.executable, "-m", "agent", "profile"], capture_output=True, text=True, env=env,
                       cwd=ROOT, timeout=60, check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [f"lepton-agent: {folder / 'pi-4b.toml'}: turbo: unknown key"]


def test_installed_package_holds_its_profiles_and_the_environment_wins(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # A wheel's copy (agent/firmware_profiles, made by setup.py) beats the checkout's; LEPTON_PROFILES_DIR both.
    import agent.profiles as profiles

    packaged = tmp_path / "site-packages" / "agent" / "firmware_profiles"
    shutil.copytree(PROFILES_DIR, packaged)
    (packaged / "pi-4b.toml").unlink()
    monkeypatch.delenv("LEPTON_PROFILES_DIR", raising=False)
    monkeypatch.setattr(profiles, "PACKAGED_DIR", packaged)
    assert profiles.profiles_dir() == packaged and "pi-4b" not in available_profiles()
    monkeypatch.setenv("LEPTON_PROFILES_DIR", str(PROFILES_DIR))
    assert profiles.profiles_dir() == PROFILES_DIR and "pi-4b" in available_profiles()
    monkeypatch.setattr(profiles, "PACKAGED_DIR", tmp_path / "absent")
    monkeypatch.delenv("LEPTON_PROFILES_DIR")
    assert profiles.profiles_dir() == PROFILES_DIR  # a checkout


def test_no_profile_files_still_names_the_class_of_this_architecture(tmp_path: Path) -> None:
    # Before: a wheel without its profiles asked for generic-arm64 on x86_64.
    empty = tmp_path / "none"
    empty.mkdir()
    assert detect(_tree(tmp_path), machine="x86_64", folder=empty).name == "generic-x86_64"
    assert detect(_tree(tmp_path), machine="aarch64", folder=empty).name == "generic-arm64"
    with pytest.raises(BadInput, match=r"profile 'generic-x86_64': no such profile in .*none \(available: none\)"):
        load_profile(detect(_tree(tmp_path), machine="x86_64", folder=empty).name, empty)


def test_install_script_renders_the_unit_for_its_prefix(tmp_path: Path) -> None:
    prefix = tmp_path / "prefix"
    r = subprocess.run(["bash", str(ROOT / "scripts" / "install.sh"), "--prefix", str(prefix), "--confdir",
                        str(tmp_path / "etc"), "--print-unit"], capture_output=True, text=True, timeout=60,
                       check=False)
    assert r.returncode == 0, r.stderr
    assert "LEPTON_PROFILES_DIR" not in r.stdout  # the installed wheel carries its profiles
    assert f"ExecStart={prefix}/venv/bin/lepton-agent run --config {tmp_path}/etc/agent.toml" in r.stdout
    assert "ProtectSystem=strict" in r.stdout and "MemoryDenyWriteExecute=yes" in r.stdout
    assert not prefix.exists()  # --print-unit only renders
