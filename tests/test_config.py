"""Config and profiles: validated at load, unknown keys rejected, errors name the key and its line."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import ROOT, Run, run_cli

from agent.config_load import load
from agent.errors import BadInput
from agent.profiles import available_profiles, load_profile
from agent.tomlpos import find_line

EXAMPLE = ROOT / "docs" / "agent.example.toml"


def _one_line(r: Run, *fragments: str) -> str:
    assert r.rc == 2, (r.rc, r.out, r.err)
    assert len(r.err_lines) == 1 and "Traceback" not in r.err, r.err
    line = r.err_lines[0]
    assert line.startswith("lepton-agent: "), line
    for fragment in fragments:
        assert fragment in line, line
    return line


def _config(tmp_path: Path, fixtures: Path, body: str = "", pipeline: str = "") -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(
        f'[agent]\ndevice_id = "dev1"\nstate_dir = "{tmp_path / "state"}"\n{body}\n'
        f'[[pipelines]]\nname = "colors"\nsource = "test:colors"\nmodel = "{fixtures / "colors_int8.json"}"\n'
        f"{pipeline}\n"
    )
    return path


def test_example_config_passes_check_config() -> None:
    r = run_cli("check-config", "--config", str(EXAMPLE))
    assert r.rc == 0, r.err
    effective = json.loads(r.out)
    assert effective["device_id"] == "pi-kitchen-01"
    assert effective["profile"]["max_fps"] == 10  # the config's override over the profile
    assert effective["spool"]["cap_bytes"] == 16777216
    assert effective["pipelines"][0]["policy"]["on_change"] is True


def test_example_documents_every_setting() -> None:
    # Every field of every section appears in the example (set or commented out).
    from agent.config import AgentConfig

    text = EXAMPLE.read_text()

    def fields(model: type) -> set[str]:
        names = set()
        for name, info in model.model_fields.items():  # type: ignore[attr-defined]
            names.add(name)
            sub = info.annotation
            if isinstance(sub, type) and hasattr(sub, "model_fields"):
                names |= fields(sub)
        return names

    missing = [n for n in fields(AgentConfig) if f"{n} =" not in text and f"[{n}]" not in text
               and f".{n}]" not in text and f"[[{n}]]" not in text]
    assert not missing, missing


def test_unknown_key_names_key_and_line(tmp_path: Path, fixtures: Path) -> None:
    path = _config(tmp_path, fixtures, pipeline="[pipelines.policy]\nmax_rate = 2\nmax_rat = 3\n")
    line = find_line(path.read_text(), ("pipelines", 0, "policy", "max_rat"))
    assert line is not None
    r = run_cli("check-config", "--config", str(path))
    _one_line(r, str(path), "pipelines[0].policy.max_rat", f"(line {line})", "unknown key")


def test_wrong_type_names_key_and_line(tmp_path: Path, fixtures: Path) -> None:
    path = _config(tmp_path, fixtures, body='[mqtt]\nkeepalive_s = "often"\n')
    _one_line(run_cli("check-config", "--config", str(path)), "mqtt.keepalive_s (line 5)")


def test_second_pipeline_error_points_at_its_line(tmp_path: Path, fixtures: Path) -> None:
    path = _config(tmp_path, fixtures, pipeline=(
        f'[[pipelines]]\nname = "two"\nsource = "test:pattern"\nmodel = "{fixtures / "colors_int8.json"}"\n'
        "threshold = 7\n"))
    _one_line(run_cli("check-config", "--config", str(path)), "pipelines[1].threshold (line 13)")


@pytest.mark.parametrize(
    ("body", "pipeline", "fragments"),
    [
        ('[mqtt]\nbroker = "http://x"\n', "", ("mqtt.broker", "mqtt:// or mqtts://")),
        ('[mqtt]\nprotocol = "4"\n', "", ("mqtt.protocol",)),
        ('[mqtt.tls]\ncert_file = "/x.pem"\n', "", ("mqtt.tls", "go together")),
        ('[mqtt.auth]\npassword_env = "X"\n', "", ("mqtt.auth", "needs a username")),
        ('[agent.extra]\nx = 1\n', "", ("agent.extra", "unknown key")),
        ("", 'task = 5\n', ("pipelines[0].task",)),
        ("", "fps = 0\n", ("pipelines[0].fps",)),
        ("", 'threshold = "0.3"\n', ("pipelines[0].threshold", "valid number")),  # fault 14a: strict numbers
        ("", "fps = 5e-324\n", ("pipelines[0].fps",)),  # fault 7: 1/fps would be inf
        ("", "fps = 0.001\n", ("pipelines[0].fps",)),  # fault 7: one frame in 1,000 s is not a pipeline
        ("[governor]\nmin_fps = 5e-324\n", "", ("governor.min_fps",)),  # fault 7, through the governor
        ('[agent]\n', "", ("invalid TOML",)),
    ],
)
def test_invalid_config(tmp_path: Path, fixtures: Path, body: str, pipeline: str, fragments: tuple[str, ...]) -> None:
    path = _config(tmp_path, fixtures, body, pipeline)
    _one_line(run_cli("check-config", "--config", str(path)), str(path), *fragments)


def test_duplicate_pipeline_names(tmp_path: Path, fixtures: Path) -> None:
    path = _config(tmp_path, fixtures, pipeline=(
        f'[[pipelines]]\nname = "colors"\nsource = "test:colors"\nmodel = "{fixtures / "colors_int8.json"}"\n'))
    _one_line(run_cli("check-config", "--config", str(path)), "used twice")


def test_missing_model_names_the_pipeline(tmp_path: Path, fixtures: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('[[pipelines]]\nname = "cam"\nsource = "test:colors"\nmodel = "gone.tflite"\n')
    _one_line(run_cli("check-config", "--config", str(path)), "pipelines[0] (cam)", "gone.tflite", "no such model")


def test_unknown_source_kind(tmp_path: Path, fixtures: Path) -> None:
    path = _config(tmp_path, fixtures).read_text().replace("test:colors", "test:nonsense")
    (tmp_path / "agent.toml").write_text(path)
    _one_line(run_cli("check-config", "--config", str(tmp_path / "agent.toml")), "pipelines[0] (colors)",
              "unknown test source")


def test_bad_source_option(tmp_path: Path, fixtures: Path) -> None:
    path = _config(tmp_path, fixtures, pipeline="[pipelines.source_options]\nfps = -1\n")
    _one_line(run_cli("check-config", "--config", str(path)), "source_options.fps")


def test_snapshot_without_encoder_is_refused(tmp_path: Path, fixtures: Path) -> None:
    import importlib.util

    if importlib.util.find_spec("agent.vision.snapshot") is not None:
        pytest.skip("this agent has the snapshot encoder")
    path = _config(tmp_path, fixtures, pipeline="[pipelines.policy.snapshot]\nenabled = true\n")
    _one_line(run_cli("check-config", "--config", str(path)), "policy.snapshot", "no snapshot encoder")


def test_missing_config_file(tmp_path: Path) -> None:
    _one_line(run_cli("check-config", "--config", str(tmp_path / "none.toml")), "none.toml", "no such config file")


def test_run_with_bad_config_exits_2(tmp_path: Path, fixtures: Path) -> None:
    path = _config(tmp_path, fixtures, body="[mqtt]\nkeepalive = 5\n")
    _one_line(run_cli("run", "--config", str(path)), "mqtt.keepalive", "unknown key")


def test_key_readable_by_others_is_refused(tmp_path: Path, fixtures: Path) -> None:
    key, cert = tmp_path / "device.key", tmp_path / "device.pem"
    key.write_text("not really a key")
    cert.write_text("not really a cert")
    os.chmod(key, 0o644)
    body = f'[mqtt]\nbroker = "mqtts://127.0.0.1:8883"\n[mqtt.tls]\ncert_file = "{cert}"\nkey_file = "{key}"\n'
    path = _config(tmp_path, fixtures, body)
    _one_line(run_cli("run", "--config", str(path)), "mqtt.tls.key_file", "readable by others", "0644")


def test_password_env_must_be_set(tmp_path: Path, fixtures: Path) -> None:
    body = '[mqtt.auth]\nusername = "u"\npassword_env = "LEPTON_TEST_NO_SUCH_VAR"\n'
    path = _config(tmp_path, fixtures, body)
    _one_line(run_cli("check-config", "--config", str(path)), "password_env", "LEPTON_TEST_NO_SUCH_VAR is not set")


def test_password_is_never_printed(tmp_path: Path, fixtures: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("hunter2-very-secret\n")
    body = f'[mqtt.auth]\nusername = "u"\npassword_file = "{secret}"\n'
    r = run_cli("check-config", "--config", str(_config(tmp_path, fixtures, body)))
    assert r.rc == 0, r.err
    assert "hunter2" not in r.out + r.err


def test_environment_overrides(tmp_path: Path, fixtures: Path) -> None:
    path = _config(tmp_path, fixtures)
    env = {"LEPTON_DEVICE_ID": "from-env", "LEPTON_BROKER": "mqtts://broker.example:9999",
           "LEPTON_STATE_DIR": str(tmp_path / "elsewhere")}
    eff = load(path, env)
    assert eff.device_id == "from-env"
    assert eff.config.mqtt.broker == ("mqtts://broker.example:9999",)
    assert eff.spool_path == tmp_path / "elsewhere" / "spool.sqlite3"
    assert eff.client_id == "lepton-from-env"
    with pytest.raises(BadInput, match=r"mqtt.broker \(from LEPTON_BROKER\)"):
        load(path, {"LEPTON_BROKER": "ftp://nope"})
    with pytest.raises(BadInput, match=r"agent.device_id \(from LEPTON_DEVICE_ID\)"):
        load(path, {"LEPTON_DEVICE_ID": "a/b#"})


def test_profiles_load_and_override(tmp_path: Path, fixtures: Path) -> None:
    assert {"generic-x86_64", "generic-arm64"} <= set(available_profiles())
    for name in available_profiles():
        profile = load_profile(name)
        assert profile.thermal_soft_c <= profile.thermal_hard_c
    path = _config(tmp_path, fixtures, body='profile = "generic-arm64"\n[profile]\nthreads = 1\n')
    eff = load(path, {})
    assert eff.profile.name == "generic-arm64" and eff.profile.threads == 1
    assert eff.spool_cap_bytes == load_profile("generic-arm64").spool_cap_bytes
    bad = _config(tmp_path, fixtures, body='profile = "toaster"\n')
    with pytest.raises(BadInput, match="profile 'toaster'"):
        load(bad, {})


def test_profile_command() -> None:
    r = run_cli("profile", "--format", "json")
    assert r.rc == 0, r.err
    info = json.loads(r.out)
    assert info["profile"] in available_profiles() and info["reason"]
    assert isinstance(info["memory_budget_mb"], (int, float))


def test_find_line_follows_tables() -> None:
    text = '[agent]\nx = 1\n\n[[pipelines]]\nname = "a"\n[pipelines.policy]\nmax_rate = 1\n' \
           '[[pipelines]]\nname = "b"\n[pipelines.policy]\nlabels = ["x"]\n'
    assert find_line(text, ("agent", "x")) == 2
    assert find_line(text, ("pipelines", 1, "name")) == 9
    assert find_line(text, ("pipelines", 1, "policy", "labels")) == 11
    assert find_line(text, ("pipelines", 0, "policy", "max_rate")) == 7
    assert find_line(text, ("pipelines", 1, "policy", "heartbeat_s")) == 10  # absent: its table


def _delivered_config(tmp_path: Path, pipeline: str, body: str = "") -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(f'[agent]\ndevice_id = "dev1"\nstate_dir = "{tmp_path / "state"}"\n{body}\n'
                    f'[[pipelines]]\nname = "door"\nsource = "test:colors"\n{pipeline}')
    return path


def test_delivered_pipeline_passes_check_config_without_a_file(tmp_path: Path) -> None:
    # The fresh device's first pipeline: no model file anywhere, only the name it will be deployed under.
    r = run_cli("check-config", "--config", str(_delivered_config(tmp_path, 'delivered = "faces"\n')))
    assert r.rc == 0, r.err
    (p,) = json.loads(r.out)["pipelines"]
    assert p["delivered"] == "faces" and p["model"] is None


@pytest.mark.parametrize(
    ("pipeline", "body", "fragments"),
    [
        ('delivered = "faces"\nmodel = "faces.json"\n', "", ("pipelines[0] (line 5)", "exactly one of model",
                                                            "has both")),
        ('threshold = 0.4\n', "", ("pipelines[0]", "exactly one of model", "has neither")),
        ('delivered = "faces/door"\n', "", ("pipelines[0].delivered (line 8)", "'faces/door' is not a model name")),
        ('delivered = ""\n', "", ("pipelines[0].delivered",)),
        ('delivered = 3\n', "", ("pipelines[0].delivered", "string")),
        ('delivered = "faces"\nlabels = "faces.txt"\n', "", ("pipelines[0]", "labels: only with model")),
        ('delivered = "faces"\n', "[delivery]\nenabled = false\n", ("pipelines[0] (door)", "delivered = 'faces'",
                                                                     "needs [delivery] enabled = true")),
    ],
)
def test_bad_delivered_pipeline(tmp_path: Path, pipeline: str, body: str, fragments: tuple[str, ...]) -> None:
    path = _delivered_config(tmp_path, pipeline, body)
    _one_line(run_cli("check-config", "--config", str(path)), str(path), *fragments)


def test_run_with_a_bad_delivered_name_exits_2(tmp_path: Path) -> None:
    path = _delivered_config(tmp_path, 'delivered = "faces@1"\n')  # the deploy target's spelling, not a name
    _one_line(run_cli("run", "--config", str(path)), str(path), "pipelines[0].delivered (line 8)",
              "'faces@1' is not a model name", "lepton-fleet deploy NAME@VERSION")
