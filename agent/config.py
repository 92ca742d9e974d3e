"""The schema of the agent's configuration (`agent.toml`, DESIGN §4): one frozen pydantic model per section.

Unknown keys are errors. The running code receives frozen settings objects (`AgentConfig`,
`Effective`), never raw dicts. Reading a file, the environment overrides and the merge over
the profile are in `agent.config_load`; finding a key's line in the TOML text is `agent.tomlpos`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictFloat, field_validator, model_validator

from agent.profiles import Profile

DEFAULT_STATE_DIR = Path("/var/lib/lepton")

# Topic levels we build from names: no MQTT wildcards, no separators, nothing a shell or a
# dashboard would trip on.
_TOPIC_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
TopicName = Annotated[str, Field(pattern=_TOPIC_NAME)]
_MODEL_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
ModelName = Annotated[str, Field(pattern=_MODEL_NAME)]
"""A model name as delivery topics carry it (docs/delivery.md §2)."""

MIN_FPS = 0.01
"""The lowest fps a pipeline runs at (one frame per 100 s): below it 1/fps stops being a usable interval."""
Threshold = Annotated[StrictFloat, Field(ge=0.0, le=1.0)]
"""A score threshold: a JSON/TOML number, never a string that looks like one."""
Fps = Annotated[StrictFloat, Field(ge=MIN_FPS, le=240)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AgentSection(_Strict):
    """Who this device is and where it keeps its state."""

    device_id: TopicName | None = None
    """The device's name in topics (`lepton/<device_id>/…`); default: the host name. Env `LEPTON_DEVICE_ID`."""
    groups: tuple[TopicName, ...] = ()
    """Groups whose commands (`lepton/group/<g>/cmd`) this device obeys."""
    state_dir: Path = DEFAULT_STATE_DIR
    """Spool, command record and model store live here. Env `LEPTON_STATE_DIR`."""
    profile: str = "auto"
    """Device class (`firmware_profiles/<class>.toml`), or `auto`: detected from the board's device-tree
    model, /proc/cpuinfo and the architecture (`lepton-agent profile` says which and why)."""
    backend: Literal["auto", "ai-edge-litert", "tflite-runtime", "tensorflow"] = "auto"
    """Interpreter package; `auto` takes the first installed (`LEPTON_BACKEND` overrides)."""


class TlsSection(_Strict):
    """TLS towards the broker; used with `mqtts://` URLs."""

    ca_file: Path | None = None
    """The one CA trusted for the broker's certificate (pinned: the system store is not used)."""
    cert_file: Path | None = None
    """Client certificate for mutual TLS."""
    key_file: Path | None = None
    """Client private key for mutual TLS; refused when group or others can read it."""

    @model_validator(mode="after")
    def _pair(self) -> TlsSection:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together (mutual TLS needs both)")
        return self


class AuthSection(_Strict):
    """Username and password for the broker. The password is never written to logs or printed."""

    username: str | None = None
    password_file: Path | None = None
    """A file holding the password (first line); keep it mode 0600."""
    password_env: str | None = None
    """The environment variable holding the password."""

    @model_validator(mode="after")
    def _one_source(self) -> AuthSection:
        if self.password_file is not None and self.password_env is not None:
            raise ValueError("give password_file or password_env, not both")
        if (self.password_file or self.password_env) and not self.username:
            raise ValueError("a password needs a username")
        return self


class MqttSection(_Strict):
    """The link to the broker."""

    broker: tuple[str, ...] = ("mqtt://localhost:1883",)
    """`mqtt://host[:port]` or `mqtts://host[:port]`; several are tried in turn. Env `LEPTON_BROKER`."""
    protocol: Literal["5", "3.1.1"] = "5"
    """MQTT protocol version; "5" falls back to 3.1.1 on a broker that does not answer or refuses MQTT 5."""
    prefix: TopicName = "lepton"
    """First topic level of everything the agent publishes and hears."""
    client_id: str | None = None
    """MQTT client id; default `lepton-<device_id>`."""
    keepalive_s: Annotated[int, Field(ge=2, le=3600)] = 30
    """Seconds of silence after which the link is probed; a dead link is dropped within 1.5 x this."""
    heartbeat_s: Annotated[float, Field(ge=1, le=3600)] = 60.0
    """The status (birth) is published again this often, with a fresh `ts`: the fleet tools show a device whose
    status is older than 2 x this + 5 s as stale (a halted broker node sends no will)."""
    connect_timeout_s: Annotated[float, Field(gt=0, le=120)] = 10.0
    """How long one connection attempt (TCP, TLS, CONNACK) may take."""
    backoff_min_s: Annotated[float, Field(gt=0, le=60)] = 1.0
    """First delay between connection attempts."""
    backoff_max_s: Annotated[float, Field(gt=0, le=3600)] = 120.0
    """Largest delay between connection attempts."""
    max_inflight: Annotated[int, Field(ge=1, le=1000)] = 32
    """Results published and not yet acknowledged (PUBACK) at any time."""
    max_packet_bytes: Annotated[int, Field(ge=65536)] = 4 * 1024 * 1024
    """The biggest message the agent reads: MQTT 5 tells the broker (it discards bigger ones); with 3.1.1
    the link skips bigger ones unread and counts them (`link.oversized`)."""
    tls: TlsSection = Field(default_factory=TlsSection)
    auth: AuthSection = Field(default_factory=AuthSection)

    @field_validator("broker", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return (v,) if isinstance(v, str) else v

    @field_validator("broker")
    @classmethod
    def _urls(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("give at least one broker URL")
        for url in v:
            parse_broker_url(url)
        return v

    @model_validator(mode="after")
    def _backoff(self) -> MqttSection:
        if self.backoff_max_s < self.backoff_min_s:
            raise ValueError("backoff_max_s is smaller than backoff_min_s")
        return self


class SnapshotSettings(_Strict):
    """A JPEG of the frame attached to a vision result (base64 in `snapshot`)."""

    enabled: bool = False
    max_bytes: Annotated[int, Field(ge=1024, le=1024 * 1024)] = 48 * 1024
    """The JPEG is re-encoded at lower quality until it fits."""


class PolicySettings(_Strict):
    """Which results leave the device, and how often."""

    labels: tuple[str, ...] = ()
    """Only these labels are reported; empty: all."""
    max_results: Annotated[int, Field(ge=1, le=1000)] = 10
    """At most this many classes or detections per result, best first."""
    on_change: bool = True
    """Report when the set of labels (or their counts) changes, not every frame."""
    heartbeat_s: Annotated[float, Field(ge=0)] = 60.0
    """With `on_change`, also report an unchanged result this often; 0: never."""
    max_rate: Annotated[float, Field(gt=0, le=1000)] = 10.0
    """Results per second at most; surplus results are dropped and counted."""
    snapshot: SnapshotSettings = Field(default_factory=SnapshotSettings)


class SampleCaptureSettings(_Strict):
    """Keeping the items that matter for the next model (docs/capture.md). Off unless enabled: frames are
    stored as JPEG at the source's resolution, audio as WAV clips, each with a JSON sidecar, under
    `<state_dir>/samples`, until the operator pulls them or the profile's `capture_cap_bytes` pushes
    the oldest out."""

    enabled: bool = False
    """Nothing is captured unless this is true."""
    band: tuple[Annotated[float, Field(ge=0, le=1)], Annotated[float, Field(ge=0, le=1)]] | None = None
    """`[low, high]`: keep an item whose top score lies inside (the model was unsure); none: no band."""
    random_rate: Annotated[float, Field(ge=0, le=1)] = 0.0
    """Fraction of items kept at random as a baseline (0.001: one in a thousand)."""
    shadow_disagreement: bool = True
    """Keep an item on which a shadow trial's candidate model (`deploy --shadow`) disagrees with the active one."""
    variant_checks_per_minute: Annotated[float, Field(ge=0, le=600)] = 0.0
    """While the governor runs a cheaper variant: items per minute also run through the base model (kept
    loaded beside the variant for this), an item they answer differently on kept (reason `variant`); 0: never."""
    max_per_minute: Annotated[float, Field(gt=0, le=6000)] = 60.0
    """Samples this pipeline keeps per minute at most; the surplus is counted as `limited`."""
    pre_roll_s: Annotated[float, Field(ge=0, le=10)] = 1.5
    """Audio before the moment that triggered a clip (so a wake word ends inside it)."""
    post_roll_s: Annotated[float, Field(ge=0, le=10)] = 0.5
    """Audio after that moment."""

    @model_validator(mode="after")
    def _band(self) -> SampleCaptureSettings:
        if self.band is not None and self.band[0] > self.band[1]:
            raise ValueError("band: low is above high")
        if self.pre_roll_s + self.post_roll_s <= 0:
            raise ValueError("pre_roll_s + post_roll_s must be above 0")
        return self


class PipelineSettings(_Strict):
    """One loop: a source feeding a model whose results pass the policy and go out over MQTT."""

    name: TopicName
    """Used in topics: `lepton/<dev>/results/<name>`."""
    source: Annotated[str, Field(min_length=1)]
    """What to read: `test:colors`, `camera:0`, `/dev/video0`, `rtsp://…`, `mic:`, a file, …"""
    source_options: dict[str, Any] = Field(default_factory=dict)
    """Options for the source kind (e.g. `fps`, `width`, `height`, `loop`)."""
    model: Path | None = None
    """A `.tflite` or a manifest `.json`; relative paths are relative to the config file."""
    delivered: str | None = None
    """Instead of `model`: the name a model is deployed under. The pipeline runs the store's trial or
    active version of that name and waits (`waiting_for_model`) until a deployment of it is active."""
    task: str | None = None
    """Run as this task instead of the manifest's or the recognised one."""
    labels: Path | None = None
    """Labels file overriding the manifest's."""
    threshold: Threshold = 0.5
    """Classes, detections and events scoring below this are not reported."""
    fps: Fps | None = None
    """Frames per second to process at most; default and ceiling: the profile's `max_fps`."""
    enabled: bool = True
    """Start with the agent (a disabled pipeline can be started by command)."""
    policy: PolicySettings = Field(default_factory=PolicySettings)
    capture: SampleCaptureSettings = Field(default_factory=SampleCaptureSettings)
    latency_budget_ms: Annotated[float, Field(gt=0)] | None = None
    """p95 latency per item the model may take on this device; with manifest `variants`, the device
    runs the cheapest one meeting it (agent.tune); default: the profile's."""
    min_agreement: Annotated[float, Field(ge=0, le=1)] | None = None
    """Fraction of items on which a variant must answer as the base model does; default: the profile's."""
    max_rss_mb: Annotated[float, Field(gt=0)] | None = None
    """Resident memory a variant may add; default: the profile's (None: not judged)."""

    @field_validator("delivered")
    @classmethod
    def _model_name(cls, v: str | None) -> str | None:
        if v is not None and not re.match(_MODEL_NAME, v):
            raise ValueError(f"{v!r} is not a model name (up to 128 of A-Z a-z 0-9 . _ -, from a letter or digit; "
                             f"the version is chosen by `lepton-fleet deploy NAME@VERSION`, not here)")
        return v

    @model_validator(mode="after")
    def _one_model(self) -> PipelineSettings:
        if (self.model is None) == (self.delivered is None):
            which = "both" if self.model is not None else "neither"
            raise ValueError(f"give exactly one of model (a file on the device) or delivered (the name a model is "
                             f"deployed under); this pipeline has {which}")
        if self.delivered is not None and self.labels is not None:
            raise ValueError("labels: only with model (a delivered model brings its own labels)")
        return self


class SpoolSection(_Strict):
    """The store-and-forward spool of results."""

    path: Path | None = None
    """SQLite file; default `<state_dir>/spool.sqlite3`."""
    cap_bytes: Annotated[int, Field(ge=64 * 1024)] | None = None
    """Payload bytes kept at most; default the profile's `spool_cap_bytes`."""


class SupervisorSection(_Strict):
    """How failing pipelines are restarted."""

    backoff_min_s: Annotated[float, Field(gt=0, le=60)] = 1.0
    backoff_max_s: Annotated[float, Field(gt=0, le=3600)] = 60.0
    max_restarts: Annotated[int, Field(ge=1, le=1000)] = 5
    """Restarts allowed within `window_s`; beyond that the pipeline is parked as `failed`."""
    window_s: Annotated[float, Field(gt=0)] = 300.0


class TelemetrySection(_Strict):
    """What the agent reports about itself on `lepton/<dev>/telemetry` (schema: docs/telemetry.md)."""

    enabled: bool = True
    """Publish telemetry every `telemetry_interval_s` of the profile."""
    root: Path = Path("/")
    """Root of the /proc and /sys trees read for telemetry, the governor and profile detection
    (tests point it at a fake tree)."""
    disk_path: Path | None = None
    """The file system whose free space is reported; default: the state directory's."""
    ring_size: Annotated[int, Field(ge=16, le=65536)] = 512
    """Latency samples kept per pipeline and stage for the percentiles (fixed memory)."""


class GovernorSection(_Strict):
    """Slows, pauses and lightens the vision loops when the SoC runs hot or the agent takes too much CPU."""

    enabled: bool = True
    interval_s: Annotated[float, Field(ge=0.2, le=300)] = 5.0
    """How often temperature and the agent's CPU share are read and a step is considered."""
    fps_step: Annotated[float, Field(gt=0.05, lt=1.0)] = 0.7
    """Each step down multiplies a vision pipeline's fps by this."""
    min_fps: Fps = 0.5
    """Steps never take a pipeline below this fps."""
    max_level: Annotated[int, Field(ge=1, le=20)] = 6
    """Steps down at most (level 0: full speed)."""
    variant_level: Annotated[int, Field(ge=0, le=20)] = 2
    """From this level on, pipelines whose manifest lists cheaper `variants` run them (0: never)."""
    min_agreement: Annotated[float, Field(ge=0, le=1)] = 0.0
    """Variants whose measured `agreement` with the base is lower are never used."""
    thermal_hysteresis_c: Annotated[float, Field(ge=0.5, le=30)] = 5.0
    """A step back up needs the temperature this far below the soft limit (a resume: below the hard limit)."""
    cpu_hysteresis_percent: Annotated[float, Field(ge=1, le=50)] = 10.0
    """A step back up needs the agent's CPU share (also as predicted after the step) this far under budget."""
    step_s: Annotated[float, Field(ge=0, le=3600)] = 10.0
    """Least time between two steps down while the pressure lasts (the SoC takes a while to cool)."""
    recover_s: Annotated[float, Field(ge=0, le=3600)] = 30.0
    """Least time after any change before a step back up."""


class HomeAssistantSection(_Strict):
    """Home Assistant MQTT discovery: sensors for this device, re-sent when Home Assistant comes online."""

    enabled: bool = False
    discovery_prefix: TopicName = "homeassistant"
    """Home Assistant's discovery prefix; its birth topic is `<prefix>/status`."""


class PrometheusSection(_Strict):
    """An HTTP endpoint with the telemetry figures for Prometheus (needs the `prometheus` extra)."""

    enabled: bool = False
    host: str = "127.0.0.1"
    """Address to listen on; loopback unless a scraper elsewhere needs it."""
    port: Annotated[int, Field(ge=1, le=65535)] = 9108


class ProfileOverrides(_Strict):
    """Profile values this device overrides (any `firmware_profiles` field)."""

    threads: Annotated[int, Field(ge=1, le=64)] | None = None
    max_fps: Fps | None = None
    camera_width: Annotated[int, Field(ge=16, le=8192)] | None = None
    camera_height: Annotated[int, Field(ge=16, le=8192)] | None = None
    max_model_mb: Annotated[float, Field(gt=0)] | None = None
    memory_budget_mb: Annotated[float, Field(gt=0)] | None = None
    telemetry_interval_s: Annotated[float, Field(ge=1, le=3600)] | None = None
    thermal_soft_c: Annotated[float, Field(ge=30, le=120)] | None = None
    thermal_hard_c: Annotated[float, Field(ge=30, le=125)] | None = None
    spool_cap_bytes: Annotated[int, Field(ge=64 * 1024)] | None = None
    capture_cap_bytes: Annotated[int, Field(ge=64 * 1024)] | None = None
    selftest_latency_ms: Annotated[float, Field(gt=0)] | None = None
    cpu_budget_percent: Annotated[float, Field(gt=0, le=100)] | None = None
    latency_budget_ms: Annotated[float, Field(gt=0)] | None = None
    min_agreement: Annotated[float, Field(ge=0, le=1)] | None = None
    max_rss_mb: Annotated[float, Field(gt=0)] | None = None


def _key_id(v: str) -> str:
    if not re.fullmatch(r"ed25519:[0-9a-f]{16}", v):
        raise ValueError("a key id is ed25519: and 16 hex digits, as `lepton-fleet keygen` prints it")
    return v


KeyId = Annotated[str, AfterValidator(_key_id)]
"""`ed25519:` + the first 16 hex digits of the sha256 of the raw public key (docs/delivery.md §3)."""


class KeyFile(_Strict):
    """A trusted public key kept in a file."""

    file: Path
    """The `.pub` PEM that `lepton-fleet keygen` writes, or a file holding the base64 of the 32 raw bytes;
    relative to the config file."""


class ShadowDefaults(_Strict):
    """What a shadow trial (`deploy --shadow`) uses for the settings its command leaves out."""

    items: Annotated[int, Field(ge=1)] | None = 200
    """Items (frames or audio windows) both models run on; a command giving only `seconds` unsets it."""
    seconds: Annotated[float, Field(gt=0)] | None = None
    """Wall-clock length of the trial (unset: run for `items`)."""
    min_agreement: Annotated[float, Field(ge=0, le=1)] = 0.9
    """Fraction of items on which the candidate must give the active model's answer to be promoted."""
    max_latency_ratio: Annotated[float, Field(gt=0)] | None = 1.5
    """Candidate p95 latency / active p95 latency must not exceed this."""
    max_latency_ms: Annotated[float, Field(gt=0)] | None = None
    """Candidate p95 latency must not exceed this many milliseconds (unset: not judged)."""
    timeout_s: Annotated[float, Field(gt=0)] = 900.0
    """A trial that has not seen enough items by then is judged on what it saw."""


class DeliverySection(_Strict):
    """Models over the air (docs/delivery.md): the store, the download, activation and probation.

    The size cap and the self-test latency budget come from the profile (`max_model_mb`,
    `selftest_latency_ms`); the keys a manifest must be signed with are `[trusted_keys]`."""

    enabled: bool = True
    """Answer `deploy`, `rollback` and `models` commands (false: they are refused as `unsupported`)."""
    store_dir: Path | None = None
    """The content-addressed model store; default `<state_dir>/models`."""
    probation_s: Annotated[float, Field(ge=0, le=86400)] = 120.0
    """After a hot swap, a pipeline crash or stall within this many seconds rolls the model back."""
    stall_s: Annotated[float, Field(gt=0, le=3600)] = 30.0
    """In probation, no item processed for this long is a stall."""
    manifest_timeout_s: Annotated[float, Field(gt=0, le=3600)] = 30.0
    """Wait this long for a model's retained manifest before failing `not_found`."""
    chunk_timeout_s: Annotated[float, Field(gt=0, le=3600)] = 10.0
    """A download window silent for this long is asked for again (six silent rounds: `not_found`)."""
    window: Annotated[int, Field(ge=1, le=256)] = 8
    """Chunk subscriptions open at once: bounds the bytes in flight to window x chunk size."""
    shadow: ShadowDefaults = Field(default_factory=ShadowDefaults)


class AgentConfig(_Strict):
    """The whole `agent.toml`."""

    agent: AgentSection = Field(default_factory=AgentSection)
    mqtt: MqttSection = Field(default_factory=MqttSection)
    spool: SpoolSection = Field(default_factory=SpoolSection)
    supervisor: SupervisorSection = Field(default_factory=SupervisorSection)
    profile: ProfileOverrides = Field(default_factory=ProfileOverrides)
    telemetry: TelemetrySection = Field(default_factory=TelemetrySection)
    governor: GovernorSection = Field(default_factory=GovernorSection)
    homeassistant: HomeAssistantSection = Field(default_factory=HomeAssistantSection)
    prometheus: PrometheusSection = Field(default_factory=PrometheusSection)
    delivery: DeliverySection = Field(default_factory=DeliverySection)
    trusted_keys: dict[KeyId, str | KeyFile] = Field(default_factory=dict)
    """Key id → Ed25519 public key (base64 of the 32 raw bytes, or `{file = "…"}`) that model manifests
    may be signed with; a manifest signed by any other key is refused."""
    pipelines: tuple[PipelineSettings, ...] = ()

    @field_validator("pipelines")
    @classmethod
    def _unique_names(cls, v: tuple[PipelineSettings, ...]) -> tuple[PipelineSettings, ...]:
        seen: set[str] = set()
        for p in v:
            if p.name in seen:
                raise ValueError(f"pipeline name {p.name!r} is used twice")
            seen.add(p.name)
        return v


class Effective(BaseModel):
    """The configuration as the daemon runs it: the file, the environment and the profile merged."""

    model_config = ConfigDict(frozen=True)

    config: AgentConfig
    path: Path | None
    """The config file, or None when running on defaults."""
    device_id: str
    profile: Profile
    profile_reason: str
    spool_path: Path
    spool_cap_bytes: int
    client_id: str
    env: dict[str, str] = Field(default_factory=dict)
    """The environment overrides that were applied (variable → value)."""

    def pipeline(self, name: str) -> PipelineSettings | None:
        return next((p for p in self.config.pipelines if p.name == name), None)

    def describe(self) -> dict[str, Any]:
        """The effective settings for `check-config` (no secrets: the password is never read here)."""
        cfg = self.config.model_dump(mode="json")
        return {
            "config": str(self.path) if self.path else None,
            "device_id": self.device_id,
            "client_id": self.client_id,
            "profile": {"reason": self.profile_reason, **self.profile.model_dump(mode="json")},
            "spool": {"path": str(self.spool_path), "cap_bytes": self.spool_cap_bytes},
            "environment": self.env,
            **{k: cfg[k] for k in ("agent", "mqtt", "supervisor", "telemetry", "governor", "homeassistant",
                                   "prometheus", "delivery", "trusted_keys", "pipelines")},
        }


def parse_broker_url(url: str) -> tuple[str, int, bool]:
    """`mqtt://host[:port]` / `mqtts://host[:port]` → (host, port, tls)."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts"):
        raise ValueError(f"{url!r}: scheme must be mqtt:// or mqtts://")
    if parts.path not in ("", "/") or parts.query or parts.username or parts.password:
        raise ValueError(f"{url!r}: give only mqtt[s]://host[:port] (credentials go in [mqtt.auth])")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{url!r}: bad port") from None
    if not parts.hostname:
        raise ValueError(f"{url!r}: no host")
    tls = parts.scheme == "mqtts"
    return parts.hostname, port or (8883 if tls else 1883), tls
