"""The wheel carries the device profiles.

`firmware_profiles/` stays at the top of the repository (the layout in docs/DESIGN.md); at build time it is
copied into the package as `agent/firmware_profiles/`, where `agent.profiles` looks first. An editable
install builds nothing: the checkout's own folder is found instead. All other metadata is in pyproject.toml.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PROFILES = Path(__file__).resolve().parent / "firmware_profiles"


class BuildWithProfiles(build_py):
    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return
        target = Path(self.build_lib) / "agent" / "firmware_profiles"
        self.mkpath(str(target))
        for path in sorted(PROFILES.glob("*.toml")):
            self.copy_file(str(path), str(target / path.name))


setup(cmdclass={"build_py": BuildWithProfiles})
