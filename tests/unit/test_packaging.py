"""Install prints no setuptools deprecation for the license (issue 17): `project.license` is
an SPDX expression, a string, not the old TOML table."""
from __future__ import annotations

import pathlib
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_the_license_is_an_spdx_string():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0"
    assert not any(c.startswith("License ::") for c in project.get("classifiers", ())), \
        "a license classifier beside an SPDX license is refused by setuptools >= 77"
