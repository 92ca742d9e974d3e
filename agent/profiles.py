"""Device profiles: what a class of board can afford (threads, fps, memory, spool, thermal limits).

One TOML file per device class lives in `firmware_profiles/<class>.toml`. The class is
detected from the board's device-tree model (`/proc/device-tree/model`, or the `Model`
line of `/proc/cpuinfo` where the device tree is not exposed), from `/proc/cpuinfo` and
from the CPU architecture, or named by the config's `agent.profile`. A profile whose
board rules match beats one that matches on the architecture alone; `detect()` says
which rule decided, so `lepton-agent profile` can tell the operator why.

Where the files are: `LEPTON_PROFILES_DIR`, else `agent/firmware_profiles/` inside the
installed package (setup.py copies them into the wheel), else the source checkout's
top-level `firmware_profiles/` (an editable install, or PYTHONPATH on a checkout).
"""

from __future__ import annotations

import os
import platform
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from agent.errors import BadInput

PROFILES_DIR = Path(__file__).resolve().parent.parent / "firmware_profiles"
"""Where the profile files live in a source checkout; `LEPTON_PROFILES_DIR` overrides."""

PACKAGED_DIR = Path(__file__).resolve().parent / "firmware_profiles"
"""Where they live in an installed wheel (copied there at build time, see setup.py)."""

FALLBACK_PROFILE = "generic-arm64"
"""The most frugal generic class, for an architecture no profile names."""

ARCH_FALLBACKS = {"x86_64": "generic-x86_64", "amd64": "generic-x86_64"}
"""Generic classes named before any profile file is read, so even a missing folder names the right one."""


class Match(BaseModel):
    """How a profile recognises its board; every given rule must hold (each rule: any of its strings)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    arch: tuple[str, ...] = ()
    """`platform.machine()` values, e.g. `aarch64`."""
    device_tree_model: tuple[str, ...] = ()
    """Substrings of /proc/device-tree/model (or of cpuinfo's `Model` line when there is no device tree)."""
    cpuinfo: tuple[str, ...] = ()
    """Substrings of /proc/cpuinfo."""


class Profile(BaseModel):
    """What one class of device can afford; the daemon sizes itself from this."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[str, Field(min_length=1)]
    """The class name, the file's stem (`generic-arm64`)."""
    description: str = ""
    match: Match = Field(default_factory=Match)
    threads: Annotated[int, Field(ge=1, le=64)]
    """Interpreter threads per model."""
    max_fps: Annotated[float, Field(gt=0, le=240)]
    """Upper bound on frames a vision pipeline processes per second."""
    camera_width: Annotated[int, Field(ge=16, le=8192)]
    """Camera capture width in pixels."""
    camera_height: Annotated[int, Field(ge=16, le=8192)]
    """Camera capture height in pixels."""
    max_model_mb: Annotated[float, Field(gt=0)]
    """Largest model file the device accepts (delivery refuses bigger ones)."""
    memory_budget_mb: Annotated[float, Field(gt=0)]
    """Resident memory the agent should stay under (install.sh turns it into systemd's MemoryMax=)."""
    telemetry_interval_s: Annotated[float, Field(ge=1, le=3600)]
    """Seconds between telemetry messages."""
    thermal_soft_c: Annotated[float, Field(ge=30, le=120)]
    """SoC temperature at which the governor starts to slow the vision loops."""
    thermal_hard_c: Annotated[float, Field(ge=30, le=125)]
    """SoC temperature at which the governor pauses the vision loops."""
    spool_cap_bytes: Annotated[int, Field(ge=64 * 1024)]
    """Payload bytes the store-and-forward spool may hold; the oldest results go first beyond it."""
    capture_cap_bytes: Annotated[int, Field(ge=64 * 1024)] = 32 * 1024 * 1024
    """Bytes the captured samples (`[pipelines.capture]`) may hold; the oldest go first beyond it."""
    selftest_latency_ms: Annotated[float, Field(gt=0)]
    """A new model's single inference must finish within this in its self-test."""
    cpu_budget_percent: Annotated[float, Field(gt=0, le=100)] = 60.0
    """The agent's share of all cores (0-100) above which the governor slows the vision loops."""
    latency_budget_ms: Annotated[float, Field(gt=0)] | None = None
    """Default p95 per-item latency budget of this class's pipelines (None: not tuned unless a pipeline says)."""
    min_agreement: Annotated[float, Field(ge=0, le=1)] = 0.9
    """Default agreement a variant needs with the base model to be chosen on the device."""
    max_rss_mb: Annotated[float, Field(gt=0)] | None = None
    """Default resident memory a variant may add (None: not judged)."""

    @model_validator(mode="after")
    def _limits_in_order(self) -> Profile:
        if self.thermal_soft_c >= self.thermal_hard_c:
            raise ValueError(f"thermal_soft_c ({self.thermal_soft_c:g}) must be below thermal_hard_c "
                             f"({self.thermal_hard_c:g})")
        return self


@dataclass(frozen=True)
class Detection:
    """The profile chosen for this machine, why, and what was read to decide."""

    name: str
    reason: str
    evidence: dict[str, str | None] = field(default_factory=dict)
    """`device_tree_model`, `cpuinfo_model`, `arch` as read (None: not there)."""


def profiles_dir() -> Path:
    """The folder holding the profile files (see the module's docstring for the order)."""
    env = os.environ.get("LEPTON_PROFILES_DIR")
    if env:
        return Path(env)
    return PACKAGED_DIR if PACKAGED_DIR.is_dir() else PROFILES_DIR


def available_profiles(folder: Path | None = None) -> list[str]:
    folder = folder or profiles_dir()
    return sorted(p.stem for p in folder.glob("*.toml"))


def load_profile(name: str, folder: Path | None = None) -> Profile:
    """Read `firmware_profiles/<name>.toml`; BadInput names the file and the field on any problem."""
    folder = folder or profiles_dir()
    path = folder / f"{name}.toml"
    if not path.is_file():
        known = ", ".join(available_profiles(folder)) or "none"
        raise BadInput(f"profile {name!r}: no such profile in {folder} (available: {known})")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise BadInput(f"{path}: invalid TOML: {exc}") from None
    try:
        return Profile.model_validate({"name": name, **data})
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        raise BadInput(f"{path}: {loc + ': ' if loc else ''}{msg}") from None


# -- what the machine says about itself -----------------------------------------------------


def _read_text(path: Path) -> str | None:
    try:
        # The device tree's strings end in NUL.
        return path.read_bytes().decode("utf-8", errors="replace").replace("\0", "").strip() or None
    except OSError:
        return None


def cpuinfo_model(cpuinfo: str | None) -> str | None:
    """The `Model : …` line Raspberry Pi kernels add to /proc/cpuinfo."""
    for line in (cpuinfo or "").splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "Model" and value.strip():
            return value.strip()
    return None


def detect(root: Path = Path("/"), machine: str | None = None, folder: Path | None = None) -> Detection:
    """Choose the profile for the machine whose /proc is under `root` and whose architecture is
    `machine` (default: this one's). Board rules beat architecture rules; BadInput when a
    profile file is broken."""
    folder = folder or profiles_dir()
    arch = (machine or platform.machine()).lower()
    dt_model = _read_text(root / "proc/device-tree/model")
    cpuinfo = _read_text(root / "proc/cpuinfo")
    cpu_model = cpuinfo_model(cpuinfo)
    board = dt_model or cpu_model
    board_source = "device-tree model" if dt_model else "cpuinfo Model"
    evidence: dict[str, str | None] = {"device_tree_model": dt_model, "cpuinfo_model": cpu_model, "arch": arch}

    best: tuple[int, str, str] | None = None  # (specificity, name, reason)
    for name in available_profiles(folder):
        rules = load_profile(name, folder).match
        reasons: list[str] = []
        specificity = 0
        if rules.device_tree_model:
            hit = next((s for s in rules.device_tree_model if board and s in board), None)
            if hit is None:
                continue
            reasons.append(f"{board_source} {board!r} contains {hit!r}")
            specificity += 4
        if rules.cpuinfo:
            hit = next((s for s in rules.cpuinfo if cpuinfo and s in cpuinfo), None)
            if hit is None:
                continue
            reasons.append(f"/proc/cpuinfo mentions {hit!r}")
            specificity += 2
        if rules.arch:
            if arch not in rules.arch:
                continue
            reasons.append(f"architecture {arch}")
            specificity += 1
        if specificity == 0:
            continue  # a profile without rules is chosen only by name
        if best is None or specificity > best[0]:
            best = (specificity, name, "; ".join(reasons))
    if best is not None:
        return Detection(best[1], best[2], evidence)
    what = f"board {board!r}, architecture {arch!r}" if board else f"architecture {arch!r}"
    if arch in ARCH_FALLBACKS:
        return Detection(ARCH_FALLBACKS[arch], f"no profile matches ({what}); using the generic one for "
                         f"{arch}", evidence)
    return Detection(FALLBACK_PROFILE, f"no profile matches ({what}); using the most frugal generic one",
                     evidence)


def detect_profile(root: Path = Path("/"), machine: str | None = None) -> tuple[str, str]:
    """The profile class for this machine and the reason it was chosen."""
    found = detect(root, machine)
    return found.name, found.reason
