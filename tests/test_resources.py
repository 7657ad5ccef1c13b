"""Files inside installed packages, found without importing the package (peftkit.resources)."""

from __future__ import annotations

from pathlib import Path

import pytest

import peftkit
from peftkit.errors import DataNotInstalledError
from peftkit.resources import package_file


def test_a_file_of_an_installed_package_is_found():
    found = package_file("peftkit", "resources.py", needed_by="a test", fix="reinstall")
    assert found == Path(peftkit.__file__).parent / "resources.py"


def test_a_missing_package_or_file_says_how_to_install_it():
    with pytest.raises(
        DataNotInstalledError,
        match=r"^the data needs the package 'no_such_pkg_x', which is not installed; run make setup$",
    ):
        package_file(
            "no_such_pkg_x", "a.csv", needed_by="the data", fix="run make setup", error=DataNotInstalledError
        )
    with pytest.raises(
        ModuleNotFoundError,
        match=r"'peftkit' is installed at .* but has no missing\.csv; a different version is probably installed: fix it",
    ):
        package_file("peftkit", "missing.csv", needed_by="the data", fix="fix it")
