"""Packaging: the licence text ships in the wheel (and the image's build context), with
the metadata an index and a licence scanner read; the image's dependencies are
hash-locked."""

from __future__ import annotations

import email
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
LICENSE = ROOT / "LICENSE"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--disable-pip-version-check",
            "--quiet",
            "wheel",
            "--no-deps",
            "--no-cache-dir",
            "--wheel-dir",
            str(out),
            str(ROOT),
        ],
        check=True,
        timeout=300,
    )
    (found,) = out.glob("valmi_sidecar-*.whl")
    return found


def test_license_file_is_the_whole_apache_2_text() -> None:
    text = LICENSE.read_text()
    assert "Apache License" in text
    assert "Version 2.0, January 2004" in text
    for section in range(1, 10):
        assert f"\n   {section}. " in text, f"section {section} is missing"
    assert "END OF TERMS AND CONDITIONS" in text


def test_wheel_carries_the_license_and_its_metadata(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        (licence,) = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
        assert LICENSE.read_bytes() == zf.read(licence)
        (meta_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        meta = email.message_from_bytes(zf.read(meta_name))
    assert "Apache-2.0" == meta["License-Expression"]
    assert ["LICENSE"] == meta.get_all("License-File")
    classifiers = meta.get_all("Classifier") or []
    assert "Programming Language :: Python :: 3.11" in classifiers
    assert "Typing :: Typed" in classifiers
    assert meta.get_all("Project-URL"), "project URLs"


def test_image_build_context_and_build_stage_include_the_license() -> None:
    """pyproject names the file, so the image's wheel build fails without it."""
    assert "!LICENSE" in (ROOT / ".dockerignore").read_text().splitlines()
    copies = [
        line for line in (ROOT / "Dockerfile").read_text().splitlines() if line.startswith("COPY")
    ]
    assert any("LICENSE" in line.split() for line in copies)


def locked(path: Path) -> dict[str, tuple[str, list[str]]]:
    """``{name: (version, [sha256, ...])}`` of a hash-locked requirements file."""
    pins: dict[str, tuple[str, list[str]]] = {}
    current = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("--hash=sha256:"):
            assert current, f"{path.name}: a hash before any requirement"
            pins[current][1].append(line.removeprefix("--hash=sha256:").rstrip(" \\"))
            continue
        spec = line.rstrip(" \\").split(";")[0].strip()
        name, sep, version = spec.partition("==")
        assert sep, f"{path.name}: {line!r} is not pinned with =="
        current = canonicalize_name(name)
        pins[current] = (version, [])
    return pins


def test_image_lock_pins_every_dependency_with_hashes() -> None:
    """requirements/image.txt agrees with pyproject.toml (else `make lock`)."""
    pins = locked(ROOT / "requirements" / "image.txt")
    assert all(len(hashes) >= 1 for _, hashes in pins.values())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for text in project["dependencies"]:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        assert name in pins, f"{name} is not in requirements/image.txt: run make lock"
        assert req.specifier.contains(pins[name][0]), f"{name}=={pins[name][0]} vs {req}"
    build = locked(ROOT / "requirements" / "build.txt")
    assert "hatchling" in build
    assert all(len(hashes) >= 1 for _, hashes in build.values())


def test_image_installs_only_hash_checked_files() -> None:
    text = (ROOT / "Dockerfile").read_text()
    runs = " ".join(line.strip() for line in text.replace("\\\n", " ").splitlines())
    for lock in ("requirements/build.txt", "requirements/image.txt"):
        assert f"--require-hashes -r {lock}" in " ".join(runs.split())
        assert f"!{lock}" in (ROOT / ".dockerignore").read_text().splitlines()
    # The backend is the locked one, and the wheel brings no unpinned dependency.
    assert "--no-build-isolation" in runs
    assert "--no-deps" in runs
