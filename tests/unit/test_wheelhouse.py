"""`hamgr.wheelhouse` without a network: names, closures, tags, and wheels written and read back."""

from __future__ import annotations

import base64
import csv
import hashlib
import importlib.metadata
import io
import zipfile
from pathlib import Path

import pytest
from attrs import evolve

from hamgr import wheelhouse as wh

BOOKWORM = wh.PlatformFacts("cpython", (3, 11), "x86_64", (2, 36))


@pytest.mark.parametrize(
    ("line", "name"),
    [
        ("attrs>=23.1", "attrs"),
        ("PyNaCl>=1.5", "pynacl"),
        ("prometheus_client (>=0.20)", "prometheus-client"),
        ("cffi>=2.0.0 ; platform_python_implementation != 'PyPy'", "cffi"),
        ('typing-extensions>=4.13.2 ; python_full_version < "3.11"', "typing-extensions"),
        ('twisted ; extra == "twisted"', None),
        ('pytest>=8; python_version >= "3.8" and extra == "dev"', None),
        ("", None),
    ],
)
def test_requirement_name(line: str, name: str | None) -> None:
    assert wh.requirement_name(line) == name


def test_closure_follows_requirements_once_and_skips_what_is_not_installed() -> None:
    installed = {
        "hamgr": ["paramiko>=5", "attrs", 'pytest ; extra == "dev"', "colorama ; os_name == 'nt'"],
        "paramiko": ["bcrypt>=3.2", "cryptography>=3.3", "PyNaCl>=1.5"],
        "cryptography": ["cffi>=2 ; platform_python_implementation != 'PyPy'"],
        "cffi": ["pycparser"],
        "pycparser": [],
        "bcrypt": [],
        "pynacl": ["cffi>=2"],
        "attrs": [],
        "pytest": ["hamgr"],  # only an extra wants it: never followed
    }
    order = wh.closure("hamgr", installed.get)
    assert order == [
        "hamgr", "paramiko", "attrs", "bcrypt", "cryptography", "pynacl", "cffi", "pycparser",
    ]  # fmt: skip


def test_closure_survives_a_cycle() -> None:
    installed = {"a": ["b"], "b": ["a", "c"], "c": ["a"]}
    assert wh.closure("a", installed.get) == ["a", "b", "c"]


@pytest.mark.parametrize(
    ("name", "version", "tags", "filename"),
    [
        ("attrs", "26.1.0", ["py3-none-any"], "attrs-26.1.0-py3-none-any.whl"),
        ("prometheus-client", "0.26", ["py3-none-any"], "prometheus_client-0.26-py3-none-any.whl"),
        (
            "pyzmq",
            "27.3.0",
            ["cp311-cp311-manylinux_2_26_x86_64", "cp311-cp311-manylinux_2_28_x86_64"],
            "pyzmq-27.3.0-cp311-cp311-manylinux_2_26_x86_64.manylinux_2_28_x86_64.whl",
        ),
        ("six", "1.16.0", ["py2-none-any", "py3-none-any"], "six-1.16.0-py2.py3-none-any.whl"),
        # Not a full product of the parts: the first tag stands for the wheel.
        (
            "odd",
            "1",
            ["cp311-cp311-linux_x86_64", "cp312-abi3-linux_x86_64"],
            "odd-1-cp311-cp311-linux_x86_64.whl",
        ),
    ],
)
def test_wheel_filename(name: str, version: str, tags: list[str], filename: str) -> None:
    assert wh.wheel_filename(name, version, tags) == filename
    if name != "odd":
        assert sorted(wh.expand_tags(filename)) == sorted(tags)


def test_wheel_filename_refuses_bad_tags() -> None:
    with pytest.raises(wh.WheelError, match="no Tag line"):
        wh.wheel_filename("x", "1", [])
    with pytest.raises(wh.WheelError, match="malformed"):
        wh.wheel_filename("x", "1", ["py3-any"])


@pytest.mark.parametrize(
    ("tag", "facts", "fits"),
    [
        ("py3-none-any", BOOKWORM, True),
        ("py2-none-any", BOOKWORM, False),
        ("cp311-cp311-manylinux_2_28_x86_64", BOOKWORM, True),
        ("cp311-cp311-manylinux_2_28_x86_64", evolve(BOOKWORM, python=(3, 12)), False),
        ("cp311-abi3-manylinux_2_34_x86_64", evolve(BOOKWORM, python=(3, 12)), True),
        ("cp311-abi3-manylinux_2_34_x86_64", evolve(BOOKWORM, python=(3, 10)), False),
        ("cp311-abi3-manylinux_2_34_x86_64", evolve(BOOKWORM, glibc=(2, 31)), False),
        ("cp310-abi3-manylinux2014_x86_64", BOOKWORM, True),
        ("cp311-cp311-manylinux2014_x86_64", evolve(BOOKWORM, machine="aarch64"), False),
        ("cp311-cp311-manylinux_2_17_x86_64", evolve(BOOKWORM, glibc=None), False),
        ("cp311-cp311-musllinux_1_2_x86_64", BOOKWORM, False),
        ("py3-none-linux_x86_64", BOOKWORM, True),
        ("py3-none-linux_x86_64", evolve(BOOKWORM, machine="aarch64"), False),
        ("cp311-cp311-manylinux_2_28_x86_64", evolve(BOOKWORM, implementation="pypy"), False),
        ("py312-none-any", BOOKWORM, False),
        ("py310-none-any", BOOKWORM, True),
        ("cp311-cp311-win_amd64", BOOKWORM, False),
        ("nonsense", BOOKWORM, False),
    ],
)  # fmt: skip
def test_compatible(tag: str, facts: wh.PlatformFacts, fits: bool) -> None:
    assert wh.compatible(tag, facts) is fits


def test_parse_glibc() -> None:
    assert wh.parse_glibc("glibc 2.36") == (2, 36)
    assert wh.parse_glibc("glibc 2.17-custom") == (2, 17)
    assert wh.parse_glibc("") is None
    assert wh.parse_glibc("musl 1.2") is None


def _read_record(archive: zipfile.ZipFile, info_dir: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(archive.read(f"{info_dir}/RECORD").decode())))


def _hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).decode().rstrip("=")


def test_write_wheel_is_reproducible_and_its_record_is_right(tmp_path: Path) -> None:
    files = [
        ("pkg-1.dist-info/METADATA", b"Metadata-Version: 2.1\nName: pkg\nVersion: 1\n", False),
        ("pkg/__init__.py", b"x = 1\n", False),
        ("pkg/tool", b"\x7fELF...", True),
        ("pkg/a,b.txt", b"comma", False),
    ]
    one, two = tmp_path / "one.whl", tmp_path / "two.whl"
    wh.write_wheel(one, files, "pkg-1.dist-info")
    wh.write_wheel(two, list(reversed(files)), "pkg-1.dist-info")
    assert one.read_bytes() == two.read_bytes()
    with zipfile.ZipFile(one) as archive:
        names = archive.namelist()
        assert names[-1] == "pkg-1.dist-info/RECORD"
        assert names.index("pkg-1.dist-info/METADATA") > names.index("pkg/tool")
        rows = {row[0]: row for row in _read_record(archive, "pkg-1.dist-info")}
        for name, data, executable in files:
            assert rows[name] == [name, _hash(data), str(len(data))]
            info = archive.getinfo(name)
            assert (info.external_attr >> 16) & 0o777 == (0o755 if executable else 0o644)
            assert info.date_time == (1980, 1, 1, 0, 0, 0)
        assert rows["pkg-1.dist-info/RECORD"] == ["pkg-1.dist-info/RECORD", "", ""]
    assert not list(tmp_path.glob("*.part"))


def _fake_install(site: Path) -> importlib.metadata.Distribution:
    """A distribution as pip leaves it in site-packages: files, .pyc, a script outside."""
    info = site / "demo_pkg-2.0.dist-info"
    (site / "demo_pkg" / "__pycache__").mkdir(parents=True)
    info.mkdir()
    (site / "demo_pkg" / "__init__.py").write_text("VALUE = 2\n")
    (site / "demo_pkg" / "__pycache__" / "__init__.cpython-311.pyc").write_bytes(b"\0")
    (site / "demo_pkg" / "helper").write_bytes(b"#!/bin/sh\n")
    (site / "demo_pkg" / "helper").chmod(0o755)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: demo-pkg\nVersion: 2.0\n")
    (info / "WHEEL").write_text("Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
    (info / "INSTALLER").write_text("pip\n")
    (info / "direct_url.json").write_text('{"url": "file:///somewhere"}')
    record = [
        "../../../bin/demo,sha256=x,10",
        "demo_pkg/__init__.py,,",
        "demo_pkg/__pycache__/__init__.cpython-311.pyc,,",
        "demo_pkg/helper,,",
        "demo_pkg-2.0.dist-info/METADATA,,",
        "demo_pkg-2.0.dist-info/WHEEL,,",
        "demo_pkg-2.0.dist-info/INSTALLER,,",
        "demo_pkg-2.0.dist-info/direct_url.json,,",
        "demo_pkg-2.0.dist-info/RECORD,,",
    ]
    (info / "RECORD").write_text("\n".join(record) + "\n")
    return importlib.metadata.PathDistribution(info)


def test_repack_of_an_installed_distribution(tmp_path: Path) -> None:
    site, out = tmp_path / "site", tmp_path / "out"
    out.mkdir()
    dist = _fake_install(site)
    house = wh.build(
        out,
        "demo-pkg",
        requires=lambda name: [] if name in ("demo-pkg", "pip") else None,
        distribution=lambda name: dist,
    )
    wheel = house.root_wheel
    assert wheel.filename == "demo_pkg-2.0-py3-none-any.whl"
    assert wheel.sha256 == hashlib.sha256(wheel.path.read_bytes()).hexdigest()
    with zipfile.ZipFile(wheel.path) as archive:
        names = set(archive.namelist())
        assert names == {
            "demo_pkg/__init__.py",
            "demo_pkg/helper",
            "demo_pkg-2.0.dist-info/METADATA",
            "demo_pkg-2.0.dist-info/WHEEL",
            "demo_pkg-2.0.dist-info/RECORD",
        }
        assert (archive.getinfo("demo_pkg/helper").external_attr >> 16) & 0o111
        assert archive.read("demo_pkg/__init__.py") == b"VALUE = 2\n"
    # Same files, same bytes: the id tells a host that already has them.
    again = wh.build(
        tmp_path / "again",
        "demo-pkg",
        requires=lambda name: [] if name in ("demo-pkg", "pip") else None,
        distribution=lambda name: dist,
    )
    assert again.id == house.id
    (site / "demo_pkg" / "__init__.py").write_text("VALUE = 3\n")
    changed = wh.build(
        tmp_path / "changed",
        "demo-pkg",
        requires=lambda name: [] if name in ("demo-pkg", "pip") else None,
        distribution=lambda name: dist,
    )
    assert changed.id != house.id


def test_repack_names_a_damaged_distribution(tmp_path: Path) -> None:
    dist = _fake_install(tmp_path / "site")
    (tmp_path / "site" / "demo_pkg" / "helper").unlink()
    with pytest.raises(wh.WheelError, match=r"demo-pkg 2\.0 is damaged here: .*helper"):
        wh.build(
            tmp_path / "out",
            "demo-pkg",
            requires=lambda name: [] if name in ("demo-pkg", "pip") else None,
            distribution=lambda name: dist,
        )


def test_build_needs_the_root_and_the_installer(tmp_path: Path) -> None:
    with pytest.raises(wh.WheelError, match="nothing to ship"):
        wh.build(tmp_path, "hamgr", requires=lambda name: None)
    with pytest.raises(wh.WheelError, match="pip is not installed"):
        wh.build(tmp_path, "hamgr", requires=lambda name: [] if name == "hamgr" else None)


def test_the_wheel_of_this_checkout_is_what_runs(tmp_path: Path) -> None:
    """hamgr is installed editable here: its wheel is packed from the source it imports."""
    import hamgr

    house = wh.build(tmp_path, requires=lambda name: [] if name in ("hamgr", "pip") else None)
    source = Path(hamgr.__file__).parent
    with zipfile.ZipFile(house.root_wheel.path) as archive:
        names = set(archive.namelist())
        assert archive.read("hamgr/wheelhouse.py") == (source / "wheelhouse.py").read_bytes()
        assert "hamgr-0.1.0.dist-info/entry_points.txt" in names
        assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)
        for top in ("hamgr", "shim", "policies", "dpdk_vhost"):
            assert f"{top}/__init__.py" in names
        wheel_meta = archive.read("hamgr-0.1.0.dist-info/WHEEL")
        if (source.parent / "dpdk_vhost" / "build" / "dpdk-vhost").exists():
            # The built data plane goes along, executable, and the wheel says it is not pure.
            info = archive.getinfo("dpdk_vhost/build/dpdk-vhost")
            assert (info.external_attr >> 16) & 0o111
            assert house.root_wheel.filename == "hamgr-0.1.0-py3-none-linux_x86_64.whl"
            assert b"Root-Is-Purelib: false" in wheel_meta
        else:
            assert house.root_wheel.filename == "hamgr-0.1.0-py3-none-any.whl"
            assert b"Root-Is-Purelib: true" in wheel_meta
    assert house.installer.name == "pip"


def test_root_contains(tmp_path: Path) -> None:
    dist = _fake_install(tmp_path / "site")
    house = wh.build(
        tmp_path / "out",
        "demo-pkg",
        requires=lambda name: [] if name in ("demo-pkg", "pip") else None,
        distribution=lambda name: dist,
    )
    assert house.root_contains("demo_pkg/helper")
    assert not house.root_contains("dpdk_vhost/build/dpdk-vhost")
