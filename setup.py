"""The wheel carries the device profiles inside the package, as agent/device_profiles/.

Their source stays the top-level device_profiles/ (a checkout and an editable install
read them there, see BUNDLED_PROFILE_DIR in agent/config.py). Everything else is
configured in pyproject.toml.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


class BuildPyWithProfiles(build_py):
    """build_py, then device_profiles/*.toml -> <build_lib>/agent/device_profiles/."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return  # the checkout's device_profiles/ is found directly
        profiles = sorted((HERE / "device_profiles").glob("*.toml"))
        if not profiles:
            raise SystemExit(
                "setup.py: device_profiles/*.toml: none found; refusing a wheel without them"
            )
        target = Path(self.build_lib) / "agent" / "device_profiles"
        target.mkdir(parents=True, exist_ok=True)
        for profile in profiles:
            shutil.copyfile(profile, target / profile.name)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        extra = [
            str(Path(self.build_lib) / "agent" / "device_profiles" / p.name)
            for p in (HERE / "device_profiles").glob("*.toml")
        ]
        return [*super().get_outputs(include_bytecode), *extra]


setup(cmdclass={"build_py": BuildPyWithProfiles})
