"""A PEP 517 build backend for the client install, in the standard library only.

It packs the repository's client modules (``MODULES``, relative to the repository
root, one level up) into a wheel, with the dependencies in ``DEPENDENCIES`` pinned
as the repository's pyproject.toml pins them: one list of pins for both installs.
It builds wheels only (``pip install ./client``), never sdists, and needs nothing
from the network to do it.
"""

from __future__ import annotations

import base64
import hashlib
import io
import tomllib
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
NAME = "compute_broker_client"

# What a developer's machine needs: the SDK, the portability layer it packages
# programs with, and the `broker` command (whose server commands then say what to
# install instead).
MODULES = (
    "broker/__init__.py",
    "broker/platforms.py",
    "broker/logformat.py",
    "broker/devcli.py",
    "broker/servicecli.py",
    "broker/cli.py",
    "broker/sdk/*.py",
    "broker/portable/*.py",
)
DEPENDENCIES = (
    "typer",
    "httpx",
    "pydantic",
    "numpy",
    "scipy",
    "jax",
    "jaxlib",
    "ml-dtypes",
    "flatbuffers",
)


def _project() -> dict[str, str]:
    with (HERE / "pyproject.toml").open("rb") as fh:
        project: dict[str, str] = tomllib.load(fh)["project"]
    return project


def _pins() -> list[str]:
    """The repository's pins of ``DEPENDENCIES``."""
    with (ROOT / "pyproject.toml").open("rb") as fh:
        pinned = tomllib.load(fh)["project"]["dependencies"]
    pins = {}
    for requirement in pinned:
        name = requirement.split("==")[0].split("[")[0].split(";")[0].strip().lower()
        pins[name] = requirement
    missing = [d for d in DEPENDENCIES if d not in pins]
    if missing:
        raise RuntimeError(f"the repository's pyproject.toml does not pin {', '.join(missing)}")
    return [pins[d] for d in DEPENDENCIES]


def _files() -> list[Path]:
    found: list[Path] = []
    for pattern in MODULES:
        matches = sorted(ROOT.glob(pattern))
        if not matches:
            raise RuntimeError(f"no {pattern} in {ROOT}")
        found += [m for m in matches if m.is_file()]
    return found


def _metadata() -> str:
    project = _project()
    lines = [
        "Metadata-Version: 2.1",
        f"Name: {project['name']}",
        f"Version: {project['version']}",
        f"Summary: {project['description']}",
        f"Requires-Python: {project['requires-python']}",
    ]
    lines += [f"Requires-Dist: {pin}" for pin in _pins()]
    return "\n".join(lines) + "\n"


def _digest(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def get_requires_for_build_wheel(config_settings: object = None) -> list[str]:
    return []


def prepare_metadata_for_build_wheel(
    metadata_directory: str, config_settings: object = None
) -> str:
    info = Path(metadata_directory) / f"{NAME}-{_project()['version']}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(_metadata())
    return info.name


def build_wheel(
    wheel_directory: str, config_settings: object = None, metadata_directory: str | None = None
) -> str:
    version = _project()["version"]
    info = f"{NAME}-{version}.dist-info"
    entries: list[tuple[str, bytes]] = [
        (path.relative_to(ROOT).as_posix(), path.read_bytes()) for path in _files()
    ]
    entries += [
        (f"{info}/METADATA", _metadata().encode()),
        (
            f"{info}/WHEEL",
            b"Wheel-Version: 1.0\nGenerator: client/build_backend.py\n"
            b"Root-Is-Purelib: true\nTag: py3-none-any\n",
        ),
        (f"{info}/entry_points.txt", b"[console_scripts]\nbroker = broker.cli:main\n"),
    ]
    record = io.StringIO()
    for name, data in entries:
        record.write(f"{name},{_digest(data)},{len(data)}\n")
    record.write(f"{info}/RECORD,,\n")
    entries.append((f"{info}/RECORD", record.getvalue().encode()))
    filename = f"{NAME}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(Path(wheel_directory) / filename, "w", zipfile.ZIP_DEFLATED) as wheel:
        for name, data in entries:
            wheel.writestr(name, data)
    return filename
