"""The operator workflow on a bridged pair of mosquitto brokers: devices on the site broker, `lepton-fleet` on
the central one (tests/fleet_workflow.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import fleet_workflow as flow
import pytest
from bridge import BridgePair

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BridgePair]:
    with BridgePair(tmp_path_factory.mktemp("bridge")) as p:
        yield p


@pytest.fixture(scope="module")
def key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "release.key"
    assert flow.fleet("keygen", "--out", str(path)).rc == 0
    return path


def central(pair: BridgePair) -> list[str]:
    return ["--broker", pair.central.url, "--timeout", "60"]


def test_deploy_and_rollback_from_central_to_site(tmp_path: Path, pair: BridgePair, key_file: Path,
                                                   backend: str) -> None:
    flow.deploy_and_rollback(tmp_path, pair.site.port, central(pair), key_file, backend, "lepton")


def test_cmd_to_a_group_on_the_site(tmp_path: Path, pair: BridgePair) -> None:
    flow.cmd_to_a_group(pair.site.url, central(pair), tmp_path, "lepton")


def test_status_live_and_stale(tmp_path: Path, pair: BridgePair) -> None:
    flow.live_and_stale(pair.site.port, central(pair), tmp_path, "lepton")


def test_results_replayed_in_order_after_the_site_broker_restarts(tmp_path: Path, pair: BridgePair) -> None:
    def restart() -> None:
        pair.site.start()
        pair.wait_bridged()

    flow.replay_after_restart(pair.site.url, pair.central.port, restart, pair.site.stop, tmp_path, "lepton")


def test_samples_pull_from_central(tmp_path: Path, pair: BridgePair, models_dir: Path) -> None:
    flow.samples_pull(tmp_path, pair.site.url, pair.site.port, central(pair), models_dir, "lepton")
