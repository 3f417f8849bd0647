"""Feature and version detection (wenet_hooks.compat)."""

from __future__ import annotations

import pytest

from wenet_hooks.compat import environment_problems, version_tuple


@pytest.mark.parametrize("version,expected", [
    ("2.4.1+cu121", (2, 4, 1)), ("2.13.0+cpu", (2, 13, 0)), ("0.19.8", (0, 19, 8)),
    ("2.1.0rc1", (2, 1, 0)), ("2.1.2a0", (2, 1, 2)), ("0.15.3.dev0", (0, 15, 3)),
])
def test_version_tuple(version, expected):
    assert version_tuple(version) == expected


def test_the_installed_versions_are_within_what_is_supported():
    assert environment_problems() == []
