"""parse_version against real `criu --version` outputs and against garbage."""

from __future__ import annotations

import pytest

from shim.criu import parse_version


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Version: 4.2.1\n", (4, 2, 1)),
        ("Version: 3.17.1\nGitID: v3.17.1-1-g5f0ad1c\n", (3, 17, 1)),
        ("Version: 4.2\n", (4, 2, 0)),
        ("Version: 4.1.1\n", (4, 1, 1)),
        ("Version: 3.18\nGitID: v3.18\n", (3, 18, 0)),
        ("Version: 4.2.1-rc1\n", (4, 2, 1)),
        # criu warns on stderr, but a caller may have merged the streams
        (
            "Warn  (criu/kerndat.c:1290): Can't keep kdat cache on non-tempfs\nVersion: 4.2.1\n",
            (4, 2, 1),
        ),
        ("  Version:   10.0.12  \n", (10, 0, 12)),
    ],
)
def test_parses_real_outputs(text: str, expected: tuple[int, int, int]) -> None:
    assert parse_version(text) == expected


def test_versions_compare_as_numbers_not_strings() -> None:
    assert parse_version("Version: 4.10") > parse_version("Version: 4.2.1")
    assert parse_version("Version: 3.17.1") < (4, 2, 0) <= parse_version("Version: 4.2")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   \n",
        "criu: command not found",
        "Version:",
        "Version: 4",
        "Version: x.y.z",
        "Version: 4.2.x",
        "Version: 4.2.1abc",
        "GitID: v4.2.1",
        "version 4.2.1",
        "Error (criu/crtools.c:280): Could not initialize kernel features detection.",
    ],
)
def test_rejects_garbage(text: str) -> None:
    with pytest.raises(ValueError, match="criu --version"):
        parse_version(text)
