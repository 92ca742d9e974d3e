"""`lepton-fleet model compare` needs only a runtime: it runs on both lanes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from compress_inputs import colour_pictures
from conftest import run_cli

from agent.manifest import load_spec


@pytest.fixture(scope="module")
def colour_eval(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("colour_eval")
    colour_pictures(folder)
    return folder


def test_float_against_int8_classifier(fixtures: Path, colour_eval: Path, backend: str) -> None:
    r = run_cli("model", "compare", str(fixtures / "colors_float.json"), str(fixtures / "colors_int8.json"),
                "--eval", str(colour_eval), str(fixtures / "video" / "colors.avi"), "--runs", "5",
                "--threads", "2", "--format", "json", prog="fleet")
    assert r.rc == 0, r.err
    report = json.loads(r.out)
    assert report["backend"]["name"] == backend and report["threads"] == [1, 2]
    assert report["eval_items"] == 150 + 12
    base, variant = report["models"]
    assert (base["role"], variant["role"]) == ("base", "variant")
    assert (base["precision"], variant["precision"]) == ("float32", "int8")
    assert base["size_ratio"] == 1.0 and variant["size_ratio"] == pytest.approx(5368 / 8568, abs=1e-4)
    for row in report["models"]:
        for n in ("1", "2"):
            assert row["latency_ms"][n]["invoke_ms"]["p50"] > 0 and row["latency_ms"][n]["pipeline_ms"]["p95"] > 0
        profile = row["op_profile"]
        assert profile["delegated_ops"] + sum(profile["off_fast_path"].values()) == row["ops"]
    assert base["latency_ratio"]["1"] == {"invoke_ms": 1.0, "pipeline_ms": 1.0}
    # XNNPACK takes the whole float graph on both runtimes; which int8 ops it takes depends on the runtime.
    assert base["op_profile"]["off_fast_path"] == {} and base["op_profile"]["partitions"] == 1
    if backend == "ai-edge-litert":
        assert variant["op_profile"]["off_fast_path"] == {"SOFTMAX": 1}
    # Two separately trained models of one task: they still give the same colour.
    agreement = variant["agreement"]
    assert agreement["kind"] == "classify" and agreement["items"] == 162
    assert agreement["top1_agreement"] >= 0.98, agreement
    assert len(variant["output_snr_db"]) == 1 and variant["output_snr_db"][0] is not None


def test_table(fixtures: Path) -> None:
    r = run_cli("model", "compare", str(fixtures / "colors_float.json"), str(fixtures / "colors_int8.json"),
                "--eval", str(fixtures / "images" / "red_1.png"), "--runs", "3", "--threads", "2", prog="fleet")
    assert r.rc == 0, r.err
    lines = r.out.splitlines()
    assert "1 evaluation items" in lines[0]
    assert lines[1].split()[:4] == ["MODEL", "PREC", "SIZE", "KB"] and "INV@2" in lines[1]
    assert lines[2].startswith("colors_float.json") and "(base)" in lines[2]
    assert lines[3].startswith("colors_int8.json") and "top-1 100.0%" in lines[3]


def test_bare_variant_runs_like_the_base(fixtures: Path) -> None:
    """The float file without its manifest gets the base's labels, task and normalisation: identical answers."""
    r = run_cli("model", "compare", str(fixtures / "colors_float.json"), str(fixtures / "colors_float.tflite"),
                "--eval", str(fixtures / "images"), "--runs", "2", "--format", "json", prog="fleet")
    assert r.rc == 0, r.err
    variant = json.loads(r.out)["models"][1]
    assert variant["agreement"]["top1_agreement"] == 1.0
    assert variant["output_snr_db"] == [None]  # identical outputs


def test_variants_manifest(fixtures: Path, tmp_path: Path) -> None:
    for name in ("colors_float", "colors_int8"):
        for suffix in (".json", ".tflite"):
            shutil.copy(fixtures / f"{name}{suffix}", tmp_path / f"{name}{suffix}")
    target = tmp_path / "colors.json"
    r = run_cli("model", "compare", str(tmp_path / "colors_float.json"), str(tmp_path / "colors_int8.json"),
                "--eval", str(fixtures / "images"), "--runs", "2", "--write-manifest", str(target), prog="fleet")
    assert r.rc == 0, r.err
    spec = load_spec(target)
    assert spec.manifest is not None and spec.path == tmp_path / "colors_float.tflite"
    assert spec.labels == ("red", "green", "blue") and spec.manifest.metrics["precision"] == "float32"
    (variant,) = spec.manifest.variants
    assert variant["file"] == "colors_int8.tflite" and variant["manifest"] == "colors_int8.json"
    assert variant["precision"] == "int8" and variant["size"] == 5368 and variant["input_shape"] == [1, 32, 32, 3]
    assert variant["metrics"]["agreement"]["kind"] == "classify"
    assert not list(tmp_path.glob("*.partial"))


def _one_line(args: list[str], *fragments: str) -> None:
    r = run_cli(*args, prog="fleet")
    assert r.rc == 2, (r.rc, r.out, r.err)
    assert len(r.err_lines) == 1 and "Traceback" not in r.err, r.err
    assert r.err_lines[0].startswith("lepton-fleet: ")
    for fragment in fragments:
        assert fragment in r.err_lines[0], r.err_lines[0]


# One case per test: a first refusal that fails must not hide the others. "{fx}" is the fixtures directory,
# "{tmp}" the test's own (holding an empty folder "empty").
@pytest.mark.parametrize(("args", "fragments"), [
    (("{fx}/colors_float.json", "--eval", "{fx}/images"), ("needs BASE and at least one VARIANT",)),
    (("{fx}/colors_float.json", "{tmp}/gone.tflite", "--eval", "{fx}/images"), ("gone.tflite", "no such model file")),
    (("{fx}/colors_float.json", "{fx}/colors_int8.json", "--eval", "{tmp}/none.png"), ("--eval", "none.png")),
    (("{fx}/colors_float.json", "{fx}/colors_int8.json", "--eval", "{tmp}/empty"), ("no image files",)),
], ids=["no-variant", "missing-variant", "missing-eval", "empty-eval"])
def test_bad_compare_inputs(fixtures: Path, tmp_path: Path, args: tuple[str, ...], fragments: tuple[str, ...]) -> None:
    (tmp_path / "empty").mkdir()
    _one_line(["model", "compare", *(a.format(fx=fixtures, tmp=tmp_path) for a in args)], *fragments)


def test_compare_writes_no_manifest_away_from_the_models(fixtures: Path, tmp_path: Path) -> None:
    base, variant = str(fixtures / "colors_float.json"), str(fixtures / "colors_int8.json")
    _one_line(["model", "compare", base, variant, "--eval", str(fixtures / "images"), "--runs", "2",
               "--write-manifest", str(tmp_path / "variants.json")], "is not beside the manifest")
    assert not (tmp_path / "variants.json").exists()


def test_variants_manifest_of_a_bare_blazeface_names_its_task(models_dir: Path, fixtures: Path,
                                                               tmp_path: Path) -> None:
    """A bare float BlazeFace file has no manifest: the written one takes the task the runtime recognises
    from its tensors (detect), so the agent can run it; --task overrides."""
    base, copy = tmp_path / "short.tflite", tmp_path / "short_copy.tflite"
    shutil.copy(models_dir / "face" / "face_detection_short_range.tflite", base)
    shutil.copy(base, copy)
    target = tmp_path / "faces.json"
    r = run_cli("model", "compare", str(base), str(copy), "--eval", str(fixtures / "images" / "squares_1.png"),
                "--runs", "2", "--threads", "1", "--write-manifest", str(target), prog="fleet")
    assert r.rc == 0, r.err
    assert json.loads(target.read_text())["task"] == "detect"
    assert load_spec(target).task == "detect"


def test_variants_manifest_of_a_model_of_no_known_task_is_refused(fixtures: Path, tmp_path: Path) -> None:
    """Nothing tells the task of a bare model with no known output layout: one line, exit 2, before measuring,
    and no manifest naming a task the agent cannot run."""
    base, copy = tmp_path / "counter.tflite", tmp_path / "counter_copy.tflite"
    shutil.copy(fixtures / "counter_stateful.tflite", base)
    shutil.copy(base, copy)
    target = tmp_path / "counter.json"
    _one_line(["model", "compare", str(base), str(copy), "--eval", str(fixtures / "images"), "--runs", "2",
               "--write-manifest", str(target)], "--write-manifest: cannot tell the task of counter.tflite",
              "give it with --task")
    assert not target.exists()
