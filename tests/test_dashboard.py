"""`lepton-fleet dashboard` in headless Chromium (Debian's, through Playwright) against a real mosquitto and a
real `lepton-agent run`: the device comes online with live fps and latency, a pipeline waiting for its
delivered model is shown as such until a deploy from the page starts it, a ping, deploys (shadow first,
promoted or refused by their trial) and rollbacks from the page show their replies and every state they pass,
a killed agent turns offline through its will, a silent one stale, a lost broker shows a banner; 1,000 devices
arrive in batched pushes and filter; the token, the audit log, read-only mode, refused arguments and /metrics.
README's screenshots (docs/img/) come from here: LEPTON_SCREENSHOTS=1 writes them."""

from __future__ import annotations

import json
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from broker import Broker, Partition, wait_until
from conftest import run_cli
from dashboard_kit import (
    browser,
    confirm,
    dashboard,
    deploy_from_page,
    have_chromium,
    is_hidden,
    row,
    screenshot,
    trail,
)
from delivery_kit import Keys, connect, publish
from fleet_workflow import close_link, device_link
from test_daemon import Daemon
from test_daemon_delivery import variant

from agent.delivery.signing import generate_key_file, load_private_key, public_text
from agent.fleet.watch import STALE_GRACE_S
from agent.mqtt.topics import FleetTopics

pytestmark = pytest.mark.skipif(not have_chromium(), reason="Debian's chromium is not installed (scripts/test "
                                                            "installs it)")
DEVICE = "cam-1"
KEEPALIVE_S = 5
TOKEN = "s3cret-token-for-the-test"  # noqa: S105 - the test's own dashboard token
DOOR = "doorbell"
"""The model name the device's `door` pipeline runs by (`delivered`): it has none of it when it starts."""


def write_config(tmp: Path, port: int, prefix: str, keys: Keys, fixtures: Path) -> Path:
    path = tmp / "agent.toml"
    path.write_text(f"""
[agent]
device_id = "{DEVICE}"
groups = ["porch"]
state_dir = "{tmp / 'state'}"
[mqtt]
broker = "mqtt://127.0.0.1:{port}"
prefix = "{prefix}"
keepalive_s = {KEEPALIVE_S}
[profile]
telemetry_interval_s = 1
[delivery]
probation_s = 2
[trusted_keys]
"{keys.kid}" = "{public_text(keys.private.public_key())}"
[[pipelines]]
name = "colors"
source = "test:colors"
model = "{fixtures / 'colors_int8.json'}"
threshold = 0.5
[pipelines.source_options]
fps = 10
hold = 4
width = 64
height = 48
[pipelines.policy]
on_change = true
[[pipelines]]
name = "squares"
source = "{fixtures / 'images' / 'squares_1.png'}"
model = "{fixtures / 'squares_ssd_uint8.json'}"
threshold = 0.5
fps = 2
[pipelines.source_options]
loop = true
[pipelines.policy]
on_change = false
max_rate = 2
[pipelines.policy.snapshot]
enabled = true
[[pipelines]]
name = "door"
source = "test:colors"
delivered = "{DOOR}"
[pipelines.source_options]
fps = 2
""")
    return path


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "release.key"
    generate_key_file(path)
    return path


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    with browser() as context:
        context.set_default_timeout(90_000)  # a shared, loaded machine: a bound for failing, not a measurement
        yield context


def test_the_fleet_device_and_models_views_live(tmp_path: Path, broker: Broker, fixtures: Path, key_file: Path,
                                                prefix: str, chromium: Any) -> None:
    keys = Keys(load_private_key(key_file))
    topics = FleetTopics(prefix)
    with connect(broker.port) as link:
        publish(link, topics, variant(tmp_path, fixtures, pad=16, version=2), "colors", 2, keys)
        publish(link, topics, variant(tmp_path, fixtures, "invoke_fails.tflite", version=3), "colors", 3, keys)
        # The same network with its labels shifted: it runs fine and names another colour for every frame.
        publish(link, topics, variant(tmp_path, fixtures, version=4, labels=["green", "blue", "red"]), "colors", 4,
                keys)
    config = write_config(tmp_path, broker.port, prefix, keys, fixtures)
    # The dashboard first: the squares pipeline's one image gives one result, at start, and results are not
    # retained (a dashboard subscribing after it would never see the snapshot).
    with dashboard(broker.url, prefix, "--key", str(key_file), log=tmp_path / "dashboard.log") as dash, \
            Daemon(config) as daemon:
        page = chromium.new_page()
        page.goto(f"{dash.url}#token={dash.token}")
        _fleet_view(page, tmp_path)
        _device_view(page, tmp_path)
        _deploy_the_awaited_model(page, lambda: _publish(broker, topics, variant(tmp_path, fixtures, version=1),
                                                         DOOR, 1, keys))
        _shadow_deploys(page, dash)
        _rollbacks(page, tmp_path, dash)

        # Killed without a goodbye: the broker's keepalive ends the session and its will turns the row offline
        # (offline, not stale: the heartbeat is 60 s, so only the will can say it this soon).
        page.goto(f"{dash.url}#/")
        daemon.terminate(signal.SIGKILL)
        page.wait_for_selector(row(DEVICE, "offline"), timeout=(3 * KEEPALIVE_S + 45) * 1000)
        assert page.locator("#count-offline").inner_text() == "1"
        # The will says only "offline": groups, class and models still come from the last birth.
        assert "porch" in page.locator(row(DEVICE)).inner_text()
        page.close()


def _fleet_view(page: Any, tmp_path: Path) -> None:
    """The device appears online; its row fills with live fps and latency from telemetry, and its `door`
    pipeline, which has no model yet, makes it a device waiting for a model: a badge and a count of its own,
    not a problem, and a filter that finds it."""
    page.wait_for_selector(row(DEVICE, "online"), timeout=120_000)
    fps = page.locator(f'{row(DEVICE)} td[data-col="fps"] [data-pipeline="colors"]')
    for column in ("fps", "p95"):
        page.wait_for_function("s => Number(document.querySelector(s)?.textContent) > 0",
                               arg=f'{row(DEVICE)} td[data-col="{column}"] [data-pipeline="colors"]',
                               timeout=60_000)
    assert float(fps.inner_text()) > 0
    row_text = page.locator(row(DEVICE)).inner_text()
    assert "porch" in row_text and "colors@1" in row_text, row_text
    waiting = page.wait_for_selector(f'{row(DEVICE)}[data-waiting="yes"]')
    assert f"door: waits for {DOOR}" in waiting.inner_text(), waiting.inner_text()
    assert "waiting for a model" in page.locator(f'{row(DEVICE)} td[data-col="presence"]').inner_text()
    problems = page.locator(f'{row(DEVICE)} td[data-col="presence"] .problem').all_inner_texts()
    assert not any("waiting" in p for p in problems), problems  # neither healthy nor failing
    assert page.locator("#count-waiting").inner_text() == "1"
    page.select_option("#state-filter", "waiting")
    page.wait_for_function("n => document.querySelector(`#shown`).textContent === n", arg="1 of 1 devices")
    assert not is_hidden(page, row(DEVICE))
    page.select_option("#state-filter", "")
    screenshot(page, tmp_path, "dashboard-fleet.png")


def _device_view(page: Any, tmp_path: Path) -> None:
    """Charts and results, which pipeline waits for which model name, and a ping from the command panel."""
    page.locator(f'{row(DEVICE)} a').click()
    page.wait_for_selector("#device-view:not([hidden])")
    note = page.wait_for_selector(f'#device-waiting li[data-pipeline="door"][data-model="{DOOR}"]')
    assert f"deploying {DOOR} to {DEVICE} starts it" in note.inner_text(), note.inner_text()
    page.wait_for_selector("#results li", timeout=30_000)
    # The detector's results carry a snapshot: drawn, with its boxes, above the list.
    page.wait_for_selector("#snapshot:not([hidden])", timeout=30_000)
    page.wait_for_function("document.getElementById('snapshot').width !== 320", timeout=30_000)
    page.locator('#commands button[data-action="ping"]').click()
    confirm(page)
    reply = page.wait_for_selector("#replies li.ok pre.reply", timeout=30_000)
    assert '"pong": true' in reply.inner_text(), reply.inner_text()
    page.wait_for_timeout(2500)  # not a synchronisation: two more telemetry points for the picture
    screenshot(page, tmp_path, "dashboard-device.png", full_page=True)


def _publish(broker: Broker, topics: FleetTopics, manifest: Path, name: str, version: int, keys: Keys) -> None:
    with connect(broker.port) as link:
        publish(link, topics, manifest, name, version, keys)


def _deploy_the_awaited_model(page: Any, publish_door: Callable[[], None]) -> None:
    """From the device view's hint to the models view, where the device is listed under the name it waits for
    (before any version of it is published, and under the version once one is); the deploy starts the pipeline
    and the waiting goes away live, everywhere."""
    page.locator(f'#device-waiting a.deploy-name[data-model="{DOOR}"]').click()
    missing = page.wait_for_selector(f'#models-rows tr[data-model="{DOOR}@"]')
    assert "none published yet" in missing.inner_text() and f"{DEVICE} (door)" in missing.inner_text()
    assert missing.query_selector("button.pick") is None  # nothing to deploy yet
    publish_door()
    awaited = f'#models-rows tr[data-model="{DOOR}@1"] td[data-col="waiting"] [data-device="{DEVICE}"]'
    assert "(door)" in page.wait_for_selector(awaited).inner_text()
    assert page.locator(f'#models-rows tr[data-model="{DOOR}@"]').count() == 0
    form = page.locator("#deploy-form")
    assert form.locator("input[name=model]").input_value() == DOOR  # filled in by the hint's link
    assert form.locator("input[name=to]").input_value() == DEVICE
    deploy_from_page(page, "1")
    done = page.wait_for_selector(f'#progress .progress-row[data-device="{DEVICE}"][data-state="active"]',
                                  timeout=90_000)
    assert f"{DOOR}@1 active" in done.inner_text()
    page.wait_for_selector(awaited, state="detached", timeout=60_000)
    page.wait_for_function(f"() => document.querySelector('#models-rows tr[data-model=\"{DOOR}@1\"]')"
                           f"?.textContent.includes('{DEVICE}')", timeout=30_000)
    page.wait_for_function("() => document.getElementById('count-waiting').textContent === '0'")
    assert page.locator(f'{row(DEVICE)}[data-waiting="yes"]').count() == 0


def _shadow_deploys(page: Any, dash: Any) -> None:
    """Shadow first, from the dialog, on a few items: a version that disagrees with the active one is rolled back
    with its reason and the trial's figures, one that agrees goes through its trial and probation to active."""
    form = page.locator("#deploy-form")
    form.locator("input[name=model]").fill("colors")
    form.locator("input[name=to]").fill(DEVICE)
    deploy_from_page(page, "4", shadow_items=6)
    refused = page.wait_for_selector(f'#progress .request:first-child .progress-row[data-device="{DEVICE}"]'
                                     '[data-state="rolled_back"]', timeout=90_000)
    assert "colors@4 rolled_back (shadow_agreement" in refused.inner_text(), refused.inner_text()
    assert refused.get_attribute("data-outcome") == "bad"
    assert "of 6 items" in refused.query_selector(".verdict").inner_text()
    steps = trail(refused)
    assert ("activating", "shadow") in steps and ("activating", "probation") not in steps, steps
    assert page.locator("#confirm-text").inner_text() == f"Deploy colors@4 to {DEVICE} (shadow first, on 6 items)?"

    deploy_from_page(page, "2", shadow_items=6)
    done = page.wait_for_selector(f'#progress .request:first-child .progress-row[data-device="{DEVICE}"]'
                                  '[data-state="active"]', timeout=90_000)
    assert "colors@2 active" in done.inner_text() and done.get_attribute("data-outcome") == "ok"
    assert "agreed on 100% of 6 items" in done.query_selector(".verdict").inner_text()
    steps = trail(done)
    # Each state it went through, in order: the trial beside the active version, then probation, then active.
    assert steps.index(("activating", "shadow")) < steps.index(("activating", "probation")) \
        < steps.index(("active", "")), steps
    assert steps[-1] == ("active", ""), steps
    page.wait_for_function("() => document.querySelector('#models-rows tr[data-model=\"colors@2\"]')"
                           "?.textContent.includes('cam-1')", timeout=30_000)
    # The thresholds the device would refuse are refused by the dashboard, naming the field, and nothing is sent.
    for bad, field in (({"shadow_items": 0}, "shadow_items"), ({"min_agreement": 1.5}, "min_agreement"),
                       ({"max_latency_ratio": 0}, "max_latency_ratio"), ({"min_agreement": "all"}, "min_agreement")):
        body = {"model": "colors", "version": "2", "to": DEVICE, "shadow": True, **bad}
        status, answer = dash.post("/api/deploy", body, token=dash.token)
        assert status == 400 and field in answer["error"], (bad, status, answer)


def _rollbacks(page: Any, tmp_path: Path, dash: Any) -> None:
    """A bad model (every invoke fails) ends rolled back, with its reason on the page; rollback from the page: to
    a version the device does not keep is refused with its reason; to the config's own model (v1, the first
    known good) ends rolled back, v1 active."""
    deploy_from_page(page, "3")
    bad = page.wait_for_selector(f'#progress .request:first-child .progress-row[data-device="{DEVICE}"]'
                                 '[data-state="rolled_back"]', timeout=90_000)
    assert "invoke_failed" in bad.inner_text(), bad.inner_text()
    rollback = page.locator("#rollback-form")
    rollback.locator("input[name=model]").fill("colors")
    rollback.locator("input[name=to]").fill(DEVICE)
    for version, state, shown in (("3", "refused", "not_found"), ("1", "rolled_back", "colors@1 rolled_back")):
        rollback.locator("input[name=version]").fill(version)
        page.locator("#rollback-button").click()
        confirm(page)
        done = page.wait_for_selector(f'#progress .request:first-child .progress-row[data-device="{DEVICE}"]'
                                      f'[data-state="{state}"]', timeout=90_000)
        assert shown in done.inner_text(), done.inner_text()
        assert done.get_attribute("data-outcome") == ("ok" if state == "rolled_back" else "bad")
    # Who runs what follows: v2 is no longer running on the device.
    page.wait_for_function("() => !document.querySelector('#models-rows tr[data-model=\"colors@2\"]')"
                           "?.textContent.includes('cam-1')", timeout=30_000)
    screenshot(page, tmp_path, "dashboard-models.png", full_page=True)
    audit = dash.stderr()
    assert audit.count("audit: deploy") == 4 and audit.count("audit: rollback") == 2, audit
    assert "by anonymous from 127.0.0.1" in audit, audit


def test_actions_need_the_token_and_are_logged(tmp_path: Path, broker: Broker, prefix: str, chromium: Any) -> None:
    agent = device_link(tmp_path / "dev", broker.url, "dev-t", prefix=prefix)
    agent.link.start()
    try:
        token_file = tmp_path / "token"
        token_file.write_text(f"{TOKEN}\n")
        with dashboard(broker.url, prefix, "--token-file", str(token_file), log=tmp_path / "d.log") as dash:
            assert dash.token is None  # a given token is never printed
            body = {"target": "dev-t", "action": "ping"}
            assert dash.post("/api/cmd", body)[0] == 401
            assert dash.post("/api/cmd", body, token=TOKEN[::-1])[0] == 401
            assert dash.post("/api/cmd", {"target": "dev/t", "action": "ping"}, token=TOKEN)[0] == 400
            assert dash.post("/api/cmd", {"target": "dev-t", "action": "format-disk"}, token=TOKEN)[0] == 400
            status, sent = dash.post("/api/cmd", body, token=TOKEN, operator="alice")
            assert status == 200 and sent["action"] == "ping", sent
            # In the page: a wrong token is refused with the reason beside the command.
            page = chromium.new_page()
            page.goto(f"{dash.url}#/device/dev-t")
            page.wait_for_selector("#device-presence:text('online')", timeout=30_000)
            page.fill("#token", "not-the-token-at-all")
            page.locator('#commands button[data-action="ping"]').click()
            confirm(page)
            refused = page.wait_for_selector("#replies li.failed")
            assert "needs the dashboard's token" in refused.inner_text()
            page.fill("#token", TOKEN)
            page.fill("#operator", "bob")
            page.locator('#commands button[data-action="ping"]').click()
            page.locator("#confirm-cancel").click()  # cancelled in the page: nothing is sent
            page.locator('#commands button[data-action="ping"]').click()
            confirm(page)
            page.wait_for_selector("#replies li.ok pre.reply")
            page.close()
            log = dash.stderr()
        assert log.count("audit: ping") == 2, log
        assert "by alice from 127.0.0.1" in log and "by bob from 127.0.0.1" in log
        assert log.count("audit: refused") == 3 and "wrong token" in log and "no token" in log
    finally:
        close_link(agent)


def test_read_only_without_key(tmp_path: Path, broker: Broker, prefix: str, chromium: Any) -> None:
    with dashboard(broker.url, prefix, log=tmp_path / "d.log") as dash:
        status, body = dash.post("/api/deploy", {"model": "colors", "version": "2", "to": "all"}, token=dash.token)
        assert status == 403 and "read-only" in body["error"] and "--key" in body["error"], body
        status, body = dash.post("/api/rollback", {"model": "colors", "to": "all"}, token=dash.token)
        assert status == 403
        page = chromium.new_page()
        page.goto(f"{dash.url}#/models")
        page.wait_for_selector("#readonly:not([hidden])")
        assert page.locator("#deploy-button").is_disabled() and page.locator("#rollback-button").is_disabled()
        page.close()
        assert "refused /api/deploy by" in dash.stderr()


def test_a_lost_broker_is_a_banner_not_an_offline_fleet(tmp_path: Path, prefix: str, chromium: Any) -> None:
    with Broker(tmp_path / "broker") as own:
        agent = device_link(tmp_path / "dev", own.url, "dev-b", prefix=prefix)
        agent.link.start()
        try:
            with dashboard(own.url, prefix, log=tmp_path / "d.log") as dash:
                page = chromium.new_page()
                page.goto(dash.url)
                page.wait_for_selector(row("dev-b", "online"), timeout=30_000)
                assert page.locator("#banner").is_hidden()
                # Killed, as a crash: a clean stop would publish the devices' wills first (mosquitto does).
                own.kill()
                banner = page.wait_for_selector("#banner:not([hidden])", timeout=60_000)
                assert "unreachable" in banner.inner_text()
                assert page.locator(row("dev-b", "online")).count() == 1  # its last state, kept
                screenshot(page, tmp_path, "dashboard-broker-down.png")
                own.start()
                page.wait_for_selector("#banner", state="hidden", timeout=60_000)
                page.close()
        finally:
            close_link(agent, 0.5)


@pytest.mark.parametrize(("args", "fragment"), [
    (("--listen", "0.0.0.0:0"), "--token-file"),
    (("--listen", "8420"), "HOST:PORT"),
    (("--token-file", "/nonexistent/token"), "cannot read"),
    (("--key", "/nonexistent/release.key"), "no such key file"),
], ids=["public-without-token", "bad-listen", "missing-token-file", "missing-key"])
def test_dashboard_bad_input(broker: Broker, args: tuple[str, ...], fragment: str) -> None:
    r = run_cli("dashboard", "--broker", broker.url, *args, prog="fleet")
    assert r.rc == 2, (r.rc, r.out, r.err)
    assert len(r.err_lines) == 1 and r.err_lines[0].startswith("lepton-fleet: ") and "Traceback" not in r.err
    assert fragment in r.err_lines[0], r.err_lines[0]


def test_metrics_carry_every_device(tmp_path: Path, broker: Broker, prefix: str) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    agents = [device_link(tmp_path / d, broker.url, d, prefix=prefix) for d in ("m-1", "m-2")]
    for a in agents:
        a.link.start()
    try:
        with dashboard(broker.url, prefix, log=tmp_path / "d.log") as dash:
            def scrape() -> set[str]:
                status, body, content_type = dash.get("/metrics")
                assert status == 200 and content_type.startswith("text/plain"), (status, content_type)
                return {s.labels.get("device", "") for f in text_string_to_metric_families(body.decode())
                        for s in f.samples}

            assert wait_until(lambda: {"m-1", "m-2"} <= scrape(), timeout=30, step=0.5), scrape()
    finally:
        for a in agents:
            close_link(a)



def test_a_thousand_devices_arrive_coalesced_and_filter(tmp_path: Path, broker: Broker, prefix: str,
                                                        chromium: Any) -> None:
    """1,000 retained statuses, then 1,000 changes in one burst: every row arrives, in far fewer pushes than
    changes (one per tick, not one per message), and the page filters them by group and by text."""
    import asyncio

    import aiohttp

    topics = FleetTopics(prefix)
    n = 1000

    def status(i: int, state: str) -> bytes:
        return json.dumps({"state": state, "ts": time.time(), "v": 1, "bdseq": 1, "groups": [f"site{i % 4}"],
                           "profile": "sim", "pipelines": [{"name": "p", "state": "running"}]}).encode()

    with connect(broker.port) as link:
        for i in range(n):
            link.publish(topics.device(f"d{i:04d}").status, status(i, "online"), qos=1, retain=True)
        link.publish_wait(topics.device("d0000").status, status(0, "online"), qos=1, retain=True)
        with dashboard(broker.url, prefix, log=tmp_path / "d.log") as dash:

            async def follow() -> tuple[int, dict[str, str]]:
                """Pushes until every device shows stopped: how many `rows` messages it took."""
                seen: dict[str, str] = {}
                messages = 0
                async with aiohttp.ClientSession() as session, session.ws_connect(dash.url + "ws") as ws:
                    first = await ws.receive_json(timeout=30)
                    assert first["type"] == "rows" and first.get("full")
                    seen.update((r["device"], r["presence"]) for r in first["rows"])
                    if len(seen) < n:  # the dashboard may still be taking in the retained statuses
                        while len(seen) < n:
                            m = await ws.receive_json(timeout=30)
                            if m["type"] == "rows":
                                seen.update((r["device"], r["presence"]) for r in m["rows"])
                    assert set(seen.values()) == {"online"}
                    await asyncio.get_running_loop().run_in_executor(None, burst)
                    while any(v != "stopped" for v in seen.values()):
                        m = await ws.receive_json(timeout=60)
                        if m["type"] == "rows":
                            messages += 1
                            seen.update((r["device"], r["presence"]) for r in m["rows"])
                return messages, seen

            def burst() -> None:
                for i in range(n):
                    link.publish(topics.device(f"d{i:04d}").status, status(i, "stopped"), qos=1, retain=True)

            # Its own thread: Playwright's sync API keeps an event loop running in this one.
            with ThreadPoolExecutor(1) as pool:
                messages, seen = pool.submit(lambda: asyncio.run(follow())).result()
            assert len(seen) == n and set(seen.values()) == {"stopped"}
            assert messages < n / 10, messages  # one push carries many devices' rows
            page = chromium.new_page()
            page.goto(dash.url)
            page.wait_for_function(f"document.querySelectorAll('#fleet-rows tr').length === {n}", timeout=60_000)
            assert page.locator("#count-offline").inner_text() == str(n)
            page.select_option("#group-filter", "site1")
            page.wait_for_function(f"document.querySelectorAll('#fleet-rows tr:not([hidden])').length === {n // 4}")
            groups = page.locator("#fleet-rows tr:not([hidden]) td:nth-child(4)").all_inner_texts()
            assert set(groups) == {"site1"}, set(groups)
            page.fill("#text-filter", "d0005")
            page.wait_for_function("document.querySelectorAll('#fleet-rows tr:not([hidden])').length === 1")
            assert page.locator("#fleet-rows tr:not([hidden])").get_attribute("data-device") == "d0005"
            assert page.locator("#shown").inner_text() == f"1 of {n} devices"
            page.close()


def test_a_silent_device_turns_stale(tmp_path: Path, broker: Broker, prefix: str, chromium: Any) -> None:
    """Its network cut with no will sent (a halted broker node's peers see this): the heartbeat stops, and the
    page calls the device stale — neither online nor offline — and counts it."""
    part = Partition(broker.port)
    gone = device_link(tmp_path / "gone", part.url, "dev-gone", prefix=prefix, heartbeat_s=1, keepalive_s=3600)
    gone.link.start()
    try:
        with dashboard(broker.url, prefix, log=tmp_path / "d.log") as dash:
            page = chromium.new_page()
            page.goto(dash.url)
            page.wait_for_selector(row("dev-gone", "online"), timeout=30_000)
            part.cut()
            page.wait_for_selector(row("dev-gone", "stale"), timeout=(2 + STALE_GRACE_S + 30) * 1000)
            assert page.locator("#count-stale").inner_text() == "1"
            assert "stale" in page.locator(f'{row("dev-gone")} .problem').inner_text()
            page.close()
    finally:
        close_link(gone, 0.5)
        part.close()
