"""The wheel a user installs: every module, the configs, the start-up .pth, the console script,
and dependencies that never move a user's torch or DeepSpeed."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import REPO


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    """The wheel built from this repository, as `pip install .` builds it."""
    out = tmp_path_factory.mktemp("wheel")
    build = tmp_path_factory.mktemp("build")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "-w", str(out), str(REPO)], capture_output=True, text=True, cwd=build, timeout=300)
    assert proc.returncode == 0, proc.stderr
    subprocess.run(["rm", "-rf", str(REPO / "build")], check=False)  # setuptools' scratch folder
    (path,) = out.glob("wenet_hooks-*.whl")
    return zipfile.ZipFile(path)


def test_wheel_holds_every_module_config_and_the_pth(wheel):
    names = set(wheel.namelist())
    modules = {str(p.relative_to(REPO)) for p in (REPO / "wenet_hooks").rglob("*.py")}
    assert modules and modules <= names, sorted(modules - names)
    configs = {"wenet_hooks/conf/" + str(p.relative_to(REPO / "conf")) for p in (REPO / "conf").rglob("*.yaml")}
    assert {"wenet_hooks/conf/wenet_hooks.yaml", "wenet_hooks/conf/convert.yaml"} <= configs <= names
    assert "wenet_hooks.pth" in names  # at the root: site-packages
    assert wheel.read("wenet_hooks.pth").decode().strip() == "import wenet_hooks.wenet.autoload"
    assert not [n for n in names if n.startswith(("tests/", "recipes/", "bench/", "wenet_hooks/demo"))]


def test_wheel_declares_the_console_script_and_lower_bounds_only(wheel):
    info = next(n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt"))
    assert "wenet-hooks-convert = wenet_hooks.convert.cli:main" in wheel.read(info).decode()
    metadata = wheel.read(next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    requires = [line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    # WeNet's own floors, and no upper bound: installing never up- or downgrades a user's stack.
    assert "torch>=2.1.2" in requires and "deepspeed>=0.14.0" in requires, requires
    assert "Requires-Python: >=3.10" in metadata


def test_installed_console_script_is_the_one_called(tmp_path):
    from conftest import CONVERT

    assert Path(CONVERT).parent == Path(sys.executable).parent
    proc = subprocess.run([CONVERT, f"model_dir={tmp_path}"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert f"{tmp_path} holds no DeepSpeed checkpoint" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no outputs/, .hydra/ or <job>.log
