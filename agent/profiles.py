"""Device profiles: what a class of board can afford (threads, fps, memory, spool, thermal limits).

One TOML file per device class lives in `firmware_profiles/<class>.toml`. For now the
class is chosen by CPU architecture (or named by the config's `profile`); matching on the
device tree and cpuinfo comes with the full profile work (issue 7), which extends `Profile`
and `detect_profile()` here.
"""

from __future__ import annotations

import os
import platform
import tomllib
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.errors import BadInput

PROFILES_DIR = Path(__file__).resolve().parent.parent / "firmware_profiles"
"""Where the profile files live in a source checkout; `LEPTON_PROFILES_DIR` overrides."""

# machine() → profile class when nothing more specific is known.
_ARCH_CLASSES = {
    "x86_64": "generic-x86_64",
    "amd64": "generic-x86_64",
    "aarch64": "generic-arm64",
    "arm64": "generic-arm64",
}


class Match(BaseModel):
    """How a profile recognises its board; every given rule must hold."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    arch: tuple[str, ...] = ()
    """`platform.machine()` values, e.g. `aarch64`."""
    device_tree_model: tuple[str, ...] = ()
    """Substrings of /proc/device-tree/model (used by the board profiles)."""
    cpuinfo: tuple[str, ...] = ()
    """Substrings of /proc/cpuinfo (used by the board profiles)."""


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
    """Resident memory the agent should stay under."""
    telemetry_interval_s: Annotated[float, Field(ge=1, le=3600)]
    """Seconds between telemetry messages."""
    thermal_soft_c: Annotated[float, Field(ge=30, le=120)]
    """SoC temperature at which the agent starts to slow its loops."""
    thermal_hard_c: Annotated[float, Field(ge=30, le=125)]
    """SoC temperature at which the agent pauses its loops."""
    spool_cap_bytes: Annotated[int, Field(ge=64 * 1024)]
    """Payload bytes the store-and-forward spool may hold; the oldest results go first beyond it."""
    selftest_latency_ms: Annotated[float, Field(gt=0)]
    """A new model's single inference must finish within this in its self-test."""


def profiles_dir() -> Path:
    return Path(os.environ.get("LEPTON_PROFILES_DIR") or PROFILES_DIR)


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
        raise BadInput(f"{path}: {loc}: {err['msg']}") from None


def detect_profile() -> tuple[str, str]:
    """The profile class for this machine and the reason it was chosen."""
    machine = platform.machine().lower()
    name = _ARCH_CLASSES.get(machine)
    if name is None:
        return "generic-arm64", f"architecture {machine!r} has no profile; using the most frugal generic one"
    return name, f"architecture {machine}"
