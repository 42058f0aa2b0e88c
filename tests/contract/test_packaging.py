"""The build stays reproducible: setuptools pinned to a range that reads the SPDX license."""

from __future__ import annotations

import re
import tomllib

from tests.support import ROOT


def test_setuptools_is_pinned_to_a_range_with_spdx_license_support() -> None:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (req,) = [r for r in meta["build-system"]["requires"] if r.startswith("setuptools")]
    m = re.fullmatch(r"setuptools>=(\d+)(?:\.[\d.]+)?,<(\d+)", req)
    assert m is not None, f"{req}: want setuptools>=LOW,<HIGH"
    low, high = int(m.group(1)), int(m.group(2))
    assert low >= 77  # PEP 639: `license = "MIT"` as an SPDX expression string
    assert high > low
    assert isinstance(meta["project"]["license"], str)  # not the deprecated table form
