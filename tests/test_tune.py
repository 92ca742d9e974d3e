"""On-device tuning (issue 20) with real variants: BlazeFace full-range float, its int8 from `lepton-fleet model
quantize`, and short-range, in one manifest `model compare` writes; real daemons on a real broker: two
device classes, the thread count changed by a `reload`, a pipeline stopped and started, and two samplers
on one model slot.

No timing threshold anywhere: each choice is checked against the rule applied to the table the device
measured. The test frame is an LFW mosaic on which the float full-range model finds 15 faces, its int8 14
and short-range 8 (on every lane and thread count: no variant agrees with the base), so a budget asking
for agreement leaves only the base model, whatever the machine; a budget that does not ask for it runs
the cheapest as measured there (int8 or short-range: each is well under the float model's cost).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from broker import Broker, Watcher, wait_until
from conftest import ROOT, run_cli
from test_daemon import Daemon, fleet
from test_telemetry_daemon import _fake_root, _validate, set_temperature

from agent.config import PipelineSettings, SupervisorSection
from agent.errors import LeptonError
from agent.pipeline import Pipeline
from agent.profiles import load_profile
from agent.tune import Budget, Row, Tuner, choose, collect

FULL, SHORT, INT8 = "face_detection_full_range.tflite", "face_detection_short_range.tflite", "full_int8.tflite"


def _fleet(*args: str) -> str:
    r = run_cli(*args, prog="fleet", timeout=300)
    assert r.rc == 0, r.err
    return r.out


@pytest.fixture(scope="module")
def faces(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> tuple[Path, Path]:
    """(the variants manifest, a looping video of one LFW mosaic with 15 faces)."""
    pytest.importorskip("ai_edge_quantizer", reason="ai-edge-quantizer (the compress extra) makes the int8 "
                        "variant; the tflite-runtime lane does not have it")
    import cv2
    from compress_inputs import face_photos

    folder = tmp_path_factory.mktemp("faces")
    calib, evaluation = face_photos(folder / "photos")
    for name in (FULL, SHORT):
        shutil.copy(models_dir / "face" / name, folder / name)
    _fleet("model", "quantize", str(folder / FULL), "--calib", str(calib), "-o", str(folder / INT8))
    manifest = folder / "faces.json"
    _fleet("model", "compare", str(folder / FULL), str(folder / INT8), str(folder / SHORT), "--eval", str(evaluation),
           "--runs", "2", "--write-manifest", str(manifest))
    assert json.loads(manifest.read_text())["task"] == "detect"  # recognised from the bare float file's tensors
    image = cv2.imread(str(evaluation / "lfw_0.png"))
    assert image is not None
    video = folder / "faces.avi"
    fourcc = cv2.VideoWriter.fourcc(*"FFV1")
    writer = cv2.VideoWriter(str(video), fourcc, 10, (image.shape[1], image.shape[0]))
    for _ in range(10):
        writer.write(image)  # lossless: every frame is the image, whatever the machine
    writer.release()
    return manifest, video


# -- the rule, on tables ----------------------------------------------------------------------------


def _row(variant: str | None, p50: float, p95: float, agreement: float, rss: float = 1.0) -> Row:
    return Row(variant, variant or "base.tflite", 24, p50, p95, agreement, rss)


def test_choice_rule_on_tables() -> None:
    rows = [_row(None, 10, 12, 1.0), _row("int8", 6, 9, 0.95), _row("short", 3, 4, 0.6)]
    # The cheapest within budget: short-range does not agree enough, int8 does and is cheaper than the base.
    assert choose(rows, Budget(20, 0.9))[:2] == (1, True)
    assert rows[2].misses == ["agreement"] and rows[0].misses == []
    assert choose(rows, Budget(20, 0.5))[:2] == (2, True)
    # RSS is a term of the budget too.
    rows[1].rss_mb = 50.0
    assert choose(rows, Budget(20, 0.9, max_rss_mb=10))[:2] == (0, True)
    # Nothing meets 1 ms: the fastest (p95) of those agreeing, and it says so.
    index, met, why = choose(rows, Budget(1, 0.9))
    assert (index, met) == (1, False) and why.startswith("nothing meets the budget") and "p95 9.00 ms > 1 ms" in why
    # A variant that failed to load is never chosen; nothing agrees: the base.
    rows = [_row(None, 10, 12, 1.0), Row("broken", "broken.tflite", error="does not load")]
    assert choose(rows, Budget(20, 0.0))[:2] == (0, True) and rows[1].misses == ["error"]


def _niced_threads() -> list[str]:
    out = []
    for stat in Path("/proc/self/task").glob("*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[16]) != 0:  # field 19 of stat: nice (after pid and comm)
                out.append(stat.read_text().split(")")[0])
    return out


# -- a real pipeline, a budget nothing meets -------------------------------------------------------------


def test_a_budget_nothing_meets_ends_in_the_documented_fallback(faces: tuple[Path, Path]) -> None:
    manifest, video = faces
    settings = PipelineSettings(name="faces", source=str(video), model=manifest, threshold=0.5,
                                source_options={"realtime": True, "loop": True, "fps": 20},
                                latency_budget_ms=0.001, min_agreement=0.0)
    profile = load_profile("generic-x86_64").model_copy(update={"threads": 2})
    stop = threading.Event()
    p = Pipeline(settings, profile=profile, supervisor=SupervisorSection(), backend=None, sink=lambda n, r: None,
                 stop=stop)
    p.start()
    try:
        tuner = Tuner(lambda: [p], stop)
        assert tuner.tunable(p)
        result = tuner.tune(p, "test")
        table = result.as_dict()
        assert table["fallback"] is True and table["why"].startswith("nothing meets the budget")
        rows = {r["file"]: r for r in table["table"]}
        assert set(rows) == {FULL, INT8, SHORT} and all(r["items"] == 24 and r["error"] is None for r in rows.values())
        assert rows[SHORT]["agreement"] == 0.0 and rows[INT8]["agreement"] == 0.0 and rows[FULL]["agreement"] == 1.0
        assert all(r["misses"] == ["latency"] for r in rows.values())
        fastest = min(rows.values(), key=lambda r: r["p95_ms"])
        assert table["chosen"] == (None if fastest["file"] == FULL else fastest["file"]) and fastest["chosen"]
        summary = result.summary()
        assert summary["fallback"] is True and summary["latency_margin_ms"] < 0
        # Measured at low priority, but the model swapped into the loop (and its interpreter's worker
        # threads) was loaded outside the niced thread: no thread of ours is left niced.
        assert wait_until(lambda: p.variant == table["chosen"], 10)
        # (The measuring thread itself ends just after its join returns: wait for the OS to reap it.)
        assert wait_until(lambda: _niced_threads() == [], 10), _niced_threads()
    finally:
        p.halt()
        p.join(10)


# -- two device classes, real daemons ------------------------------------------------------------------


def _config(tmp: Path, port: int, device: str, manifest: Path, video: Path, profile: str, overrides: str,
            pipeline: str, root: Path) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "agent.toml"
    path.write_text(f"""
[agent]
device_id = "{device}"
state_dir = "{tmp / 'state'}"
profile = "{profile}"
[mqtt]
broker = "mqtt://127.0.0.1:{port}"
keepalive_s = 5
[profile]
telemetry_interval_s = 1
max_fps = 30
thermal_soft_c = 60
thermal_hard_c = 70
cpu_budget_percent = 100
{overrides}
[telemetry]
root = "{root}"
[governor]
interval_s = 0.2
step_s = 0
recover_s = 0
max_level = 2
[[pipelines]]
name = "faces"
source = "{video}"
model = "{manifest}"
threshold = 0.5
{pipeline}
[pipelines.source_options]
realtime = true
loop = true
fps = 10
[pipelines.policy]
on_change = false
max_rate = 100
""")
    return path


def _tuned(w: Watcher, device: str, predicate: Any = lambda t: True) -> dict[str, Any]:
    return w.wait_json(f"{device}/telemetry", lambda m: bool(m) and m[-1]["pipelines"]["faces"].get("tune") is not None
                       and predicate(m[-1]["pipelines"]["faces"]["tune"]), timeout=120)[-1]["pipelines"]["faces"]


def _check_rule(table: dict[str, Any]) -> None:
    """The chosen row is the rule's on the measured rows: the cheapest (p50) of those meeting the budget."""
    rows, budget = table["table"], table["budget"]
    meeting = [r for r in rows if r["p95_ms"] <= budget["latency_budget_ms"]
               and r["agreement"] >= budget["min_agreement"]]
    assert meeting and not table["fallback"]
    assert table["chosen"] == min(meeting, key=lambda r: r["p50_ms"])["variant"]
    assert [r["chosen"] for r in rows].count(True) == 1


def test_two_device_classes_choose_from_the_same_manifest(tmp_path: Path, broker: Broker,
                                                          faces: tuple[Path, Path]) -> None:
    manifest, video = faces
    root = _fake_root(tmp_path / "five", 45.0)  # the Pi 5's SoC: the one that will run hot
    # A Zero-class board, one thread, its budget from its profile: any agreement will do.
    cool = _fake_root(tmp_path / "zero", 45.0)
    zero = _config(tmp_path / "zero", broker.port, "d-zero", manifest, video, "pi-zero-2w",
                   "threads = 1\nlatency_budget_ms = 1000\nmin_agreement = 0.0", "", cool)
    # A Pi 5-class board, two threads, the pipeline's own keys: half the answers must be the base's.
    five = _config(tmp_path / "five", broker.port, "d-five", manifest, video, "pi-5", "threads = 2",
                   "latency_budget_ms = 1000\nmin_agreement = 0.5", root)
    with Watcher(broker.port, ["lepton/d-zero/#", "lepton/d-five/#"]) as w, Daemon(zero) as dz, Daemon(five) as d5:
        _tuned(w, "d-zero")
        _tuned(w, "d-five")
        tables = {}
        for device in ("d-zero", "d-five"):
            rc, (status,) = fleet(broker.port, "cmd", device, "status")
            assert rc == 0 and status["ok"], status
            table = status["result"]["tune"]["faces"]
            assert table["trigger"] == "start" and {r["file"] for r in table["table"]} == {FULL, INT8, SHORT}
            assert all(r["items"] == 24 and r["p50_ms"] <= r["p95_ms"] and r["rss_mb"] >= 0 for r in table["table"])
            _check_rule(table)
            tables[device] = table
        assert tables["d-zero"]["threads"] == 1 and tables["d-five"]["threads"] == 2
        by_file = {r["file"]: r for r in tables["d-five"]["table"]}
        assert by_file[SHORT]["misses"] == ["agreement"] and by_file[INT8]["misses"] == ["agreement"]
        # Same manifest, different boards, different variants: the Pi 5 class keeps the base (agreement
        # decides); the Zero class runs the cheapest it measured, a cheaper variant.
        assert tables["d-five"]["chosen"] is None
        assert tables["d-zero"]["chosen"] in (INT8, SHORT), tables["d-zero"]

        # The chosen variant runs: results name it, and seq has no gap across the swap.
        chosen = tables["d-zero"]["chosen"]
        results = w.wait_json("d-zero/results/faces", lambda m: len(m) > 3 and m[-1]["model"].get("variant") == chosen,
                              timeout=60)
        assert [r["seq"] for r in results] == list(range(1, len(results) + 1))

        # A `tune` command measures again and answers with the table.
        rc, (reply,) = fleet(broker.port, "cmd", "d-five", "tune", '{"pipeline": "faces"}', "--timeout", "60")
        assert rc == 0 and reply["ok"], reply
        again = reply["result"]["tune"]["faces"]
        assert again["trigger"] == "command"
        _check_rule(again)
        rc, (bad,) = fleet(broker.port, "cmd", "d-five", "tune", '{"pipeline": "nope"}')
        assert not bad["ok"] and bad["error"]["code"] == "not_found"

        # Pressure: the governor steps down and the device tunes again under it.
        set_temperature(root, 64.0)
        hot = _tuned(w, "d-five", lambda t: t["trigger"].startswith("pressure level"))
        assert hot["tune"]["chosen"] == hot["variant"]
        rc, (status,) = fleet(broker.port, "cmd", "d-five", "status")
        table = status["result"]["tune"]["faces"]
        assert table["level"] >= 1 and status["result"]["governor"]["level"] >= 1
        _check_rule(table)
        _validate(w.json("/telemetry"))  # with the tune's summary, as docs/telemetry.schema.json says

        # The fleet's view: which variant each class runs, and why, as the boards measured it.
        r = run_cli("model", "report", "face_detection_full_range", "--broker", f"mqtt://127.0.0.1:{broker.port}",
                    "--timeout", "6", "--format", "json", prog="fleet")
        assert r.rc == 0, r.err
        report = json.loads(r.out)
        assert set(report["classes"]) == {"pi-zero-2w", "pi-5"}, r.out
        for cls, device in (("pi-zero-2w", "d-zero"), ("pi-5", "d-five")):
            (mine,) = report["classes"][cls]["devices"][device]
            assert report["classes"][cls]["chosen"] == {mine["chosen"] or "(base)": 1}
            assert {row["file"] for row in mine["table"]} == {FULL, INT8, SHORT}
        text = run_cli("model", "report", "face_detection_full_range", "--broker", f"mqtt://127.0.0.1:{broker.port}",
                       "--timeout", "3", prog="fleet")
        assert text.rc == 0 and "CLASS pi-5: runs" in text.out and "why: cheapest meeting the budget" in text.out
        none = run_cli("model", "report", "nope", "--broker", f"mqtt://127.0.0.1:{broker.port}", "--timeout", "2",
                       prog="fleet")
        assert none.rc == 1 and "no device of all reported a tune of model nope" in none.err
        wrong = run_cli("model", "report", "x", "--to", "a/b", "--broker", f"mqtt://127.0.0.1:{broker.port}",
                      prog="fleet")
        assert wrong.rc == 2 and wrong.err_lines == ["lepton-fleet: TARGET 'a/b': give a device id, group:NAME or all"]
        assert dz.terminate() == 0 and d5.terminate() == 0
    for name in ("zero", "five"):
        log = (tmp_path / name / "agent.log").read_text()
        assert "Traceback" not in log and "tune of pipeline faces (start)" in log


def test_bad_budget_keys_are_one_line_errors(tmp_path: Path, faces: tuple[Path, Path]) -> None:
    manifest, video = faces
    for bad, words in (("latency_budget_ms = -5", "latency_budget_ms"), ("min_agreement = 1.5", "min_agreement")):
        path = tmp_path / "agent.toml"
        path.write_text(f'[agent]\ndevice_id = "d"\nstate_dir = "{tmp_path}"\n[[pipelines]]\nname = "f"\n'
                        f'source = "{video}"\nmodel = "{manifest}"\n{bad}\n')
        r = run_cli("check-config", "--config", str(path))
        assert r.rc == 2 and words in r.err and "Traceback" not in r.err, r.err
    assert ROOT.exists()


# -- while the agent runs: threads changed by a reload, a restart, two samplers ----------------------------


def _status(port: int, device: str) -> dict[str, Any]:
    rc, (status,) = fleet(port, "cmd", device, "status")
    assert rc == 0 and status["ok"], status
    result: dict[str, Any] = status["result"]
    return result


def _running(status: dict[str, Any]) -> dict[str, Any]:
    (p,) = [p for p in status["pipelines"] if p["name"] == "faces"]
    return p


def test_threads_changed_by_reload_and_a_restart_tune_again(tmp_path: Path, broker: Broker,
                                                           faces: tuple[Path, Path]) -> None:
    manifest, video = faces
    root = _fake_root(tmp_path / "root", 45.0)
    budget = "latency_budget_ms = 1000\nmin_agreement = 0.0"
    config = _config(tmp_path / "d", broker.port, "d-thr", manifest, video, "pi-4b", "threads = 1", budget, root)
    with Watcher(broker.port, ["lepton/d-thr/#"]) as w, Daemon(config) as d:
        first = _tuned(w, "d-thr")["tune"]
        assert first["trigger"] == "start"
        status = _status(broker.port, "d-thr")
        assert status["tune"]["faces"]["threads"] == 1 and _running(status)["threads"] == 1

        # One thread more, from the config, without a restart: the running variant is loaded again with two
        # threads and swapped in between two items, then measured again at two threads.
        config.write_text(config.read_text().replace("threads = 1", "threads = 2"))
        rc, (reply,) = fleet(broker.port, "cmd", "d-thr", "reload")
        assert rc == 0 and reply["ok"], reply
        assert "threads" in reply["result"]["applied"] and reply["result"]["restart_needed"] == [], reply
        assert reply["result"]["unchanged"] == ["faces"]
        again = _tuned(w, "d-thr", lambda t: t["trigger"] == "threads 1 -> 2")["tune"]
        status = _status(broker.port, "d-thr")
        table = status["tune"]["faces"]
        assert table["threads"] == 2 and table["trigger"] == "threads 1 -> 2" and table["ts"] == again["ts"]
        assert {r["file"] for r in table["table"]} == {FULL, INT8, SHORT}
        _check_rule(table)
        running = _running(status)
        assert running["threads"] == 2 and running["state"] == "running"
        chosen = table["chosen"]
        assert chosen in (INT8, SHORT), table  # cheaper than the float full-range base on any machine
        # The loop never restarted: one run of seq from the first result through both swaps and the tunes.
        results = w.wait_json("d-thr/results/faces", lambda m: len(m) > 3 and m[-1]["model"].get("variant") == chosen,
                              timeout=60)
        assert [r["seq"] for r in results] == list(range(1, len(results) + 1))

        # A stop and a start load the base model afresh: the tuner notices and measures again.
        for verb in ("stop", "start"):
            rc, (ok,) = fleet(broker.port, "cmd", "d-thr", verb, '{"pipeline": "faces"}')
            assert rc == 0 and ok["ok"], ok
        restarted = _tuned(w, "d-thr", lambda t: t["trigger"] == "restart")
        assert restarted["tune"]["chosen"] in (INT8, SHORT)
        status = _status(broker.port, "d-thr")
        assert status["tune"]["faces"]["trigger"] == "restart" and status["tune"]["faces"]["threads"] == 2
        w.wait_json("d-thr/results/faces", lambda m: m[-1]["model"].get("variant") == restarted["tune"]["chosen"],
                    timeout=60)
        assert d.terminate() == 0
    log = (tmp_path / "d" / "agent.log").read_text()
    assert "Traceback" not in log and "reload: interpreter threads 1 -> 2" in log


def _tune_items(p: Pipeline, start: threading.Barrier, got: dict[str, Any]) -> None:
    start.wait()
    try:
        got["tune"] = collect(p, n=2, timeout=30)
    except LeptonError as exc:
        got["tune"] = exc


def test_a_tune_and_a_self_test_sample_one_slot_at_once(faces: tuple[Path, Path]) -> None:
    """The tune's items and the delivery self-test's item come through one slot at the same moment: each
    sampler gets whole items of its own (without the slot's sampler lock the second request replaces the
    first one's and the first waits in vain: the tune fails with 'no item came from the loop')."""
    manifest, video = faces
    settings = PipelineSettings(name="faces", source=str(video), model=manifest, threshold=0.5,
                                source_options={"realtime": True, "loop": True, "fps": 5})
    stop = threading.Event()
    p = Pipeline(settings, profile=load_profile("generic-x86_64").model_copy(update={"threads": 1}),
                 supervisor=SupervisorSection(), backend=None, sink=lambda n, r: None, stop=stop)
    p.start()
    try:
        # The first item has been processed: the loop runs, the samplers wait only for its next items.
        assert p.slot.sample(30) is not None
        for _ in range(3):
            start = threading.Barrier(2)
            got: dict[str, Any] = {}
            worker = threading.Thread(target=_tune_items, args=(p, start, got))
            worker.start()
            start.wait()
            got["selftest"] = p.slot.sample(30)
            worker.join(30)
            assert not worker.is_alive()
            tune, selftest = got["tune"], got["selftest"]
            assert isinstance(tune, list) and len(tune) == 2, tune
            assert isinstance(selftest, np.ndarray) and selftest.shape == tune[0].shape
            assert all(item is not selftest for item in tune) and tune[0] is not tune[1]
    finally:
        p.halt()
        p.join(10)
