"""The package works when installed from its wheel, not only from a checkout.

Builds the wheel from a copy of the working tree (so the checkout gets no build/ or egg-info writes),
installs it with --no-deps into a fresh venv that borrows the project venv's site-packages for the
dependencies only (a .pth line: the editable install's finder there is never run), and from a
directory outside the repository checks that every module of the six packages imports from the new
venv, then runs `trtserve-build --model tiny-qwen2` and `trtserve-generate` on the result (the build
shares the test session's cache directory, so the offline tokenizer is trained once per session; its
corpus is still read from the installed package to find its cache key).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("engine_format", "builder", "runtime", "plugins", "grpc_service", "bench")
PACKAGE_DATA = ("builder/configs", "grpc_service/proto")
SKIP = shutil.ignore_patterns("__pycache__", "*.pyc")

# In the fresh venv: import every module of the packages, and print where each one came from.
IMPORT_ALL = """
import importlib, pkgutil, sys
for name in sys.argv[1:]:
    package = importlib.import_module(name)
    print(package.__file__)
    for info in pkgutil.walk_packages(package.__path__, name + "."):
        print(importlib.import_module(info.name).__file__)
"""


def _run(args: list[str], cwd: Path, timeout: float = 120) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert result.returncode == 0, f"{' '.join(args)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def _files(root: Path, subdirs: tuple[str, ...], suffix: str | None = None) -> set[str]:
    return {p.relative_to(root).as_posix() for subdir in subdirs for p in (root / subdir).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and (suffix is None or p.suffix == suffix)}


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the working tree's packages: the wheel is built from it and compared with it."""
    src = tmp_path_factory.mktemp("wheel-src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, src / pkg, ignore=SKIP)
    return src


@pytest.fixture(scope="module")
def wheel(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    dist = tmp_path_factory.mktemp("wheel-dist")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", str(dist), str(source)], cwd=source, timeout=180)
    (built,) = dist.glob("trtserve-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    venv = tmp_path_factory.mktemp("installed") / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=venv.parent)
    site = Path(_run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                     cwd=venv.parent).strip())
    (site / "zz_trtserve_dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--no-deps",
          "--no-index", "-q", str(wheel)], cwd=venv.parent)
    return venv


def test_wheel_holds_every_module_and_the_package_data(source: Path, wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = _files(source, PACKAGES, ".py")
    assert modules - names == set(), "modules missing from the wheel"
    data = _files(source, PACKAGE_DATA) - modules
    assert data, "no package data found in the checkout"
    assert data - names == set(), "package data missing from the wheel"
    assert {"builder/configs/models/tiny-qwen2.yaml", "builder/configs/tokenizer/extra_corpus.txt",
            "grpc_service/proto/trtserve.proto"} <= names


def test_installed_package_builds_and_generates_outside_the_checkout(
        source: Path, venv: Path, cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    work = tmp_path_factory.mktemp("user-dir")
    assert ROOT not in work.parents
    bin_dir = venv / "bin"

    imported = _run([str(bin_dir / "python"), "-c", IMPORT_ALL, *PACKAGES], cwd=work).split()
    assert len(imported) == len(_files(source, PACKAGES, ".py"))
    outside = [f for f in imported if Path(f).resolve().is_relative_to(ROOT) or not f.startswith(str(venv))]
    assert outside == [], "modules imported from outside the installed package"

    out = _run([str(bin_dir / "trtserve-build"), "--model", "tiny-qwen2", "--output", "engines/tiny",
                "--cache-dir", str(cache_dir), "--quiet"], cwd=work, timeout=180)   # the session's tokenizer
    assert "engines/tiny: built" in out
    assert (work / "engines" / "tiny" / "engine.json").is_file()
    assert (work / "engines" / "tiny" / "tokenizer" / "tokenizer.json").is_file()

    out = _run([str(bin_dir / "trtserve-generate"), "--engine", "engines/tiny", "--max-tokens", "6",
                "--ignore-eos", "--chat", "--prompt", "Once upon a time", "--prompt", "Hello"], cwd=work)
    lines = out.splitlines()
    assert [line[:4] for line in lines] == ["[0] ", "[1] "] and all(line.endswith("(length)") for line in lines), out
