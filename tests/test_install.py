"""hakd installed like a package (not editable), run from a directory that is not the repository's."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("infra", "teacher_cache", "student_train", "analysis")


def _files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


@pytest.mark.slow
@pytest.mark.timeout(2400)  # whole runs through subprocesses: minutes on 2 shared cores
def test_an_installed_hakd_runs_from_any_directory_and_writes_only_under_out(tmp_path):
    src = tmp_path / "src"  # a copy of the source, so that the build writes nothing into the repository
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
                    str(site), str(src)], check=True, capture_output=True, timeout=600)
    assert (site / "bin" / "hakd").is_file()
    env = {**os.environ, "PYTHONPATH": str(site), "RAY_USAGE_STATS_ENABLED": "0"}
    where = subprocess.run([sys.executable, "-c", "import infra.config as c, teacher_cache.embedded as e; "
                            "print(c.DEMO_CONFIG); print(e.embedded_weights('vit_demo'))"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, check=True).stdout.split()
    assert where == [str(site / "infra" / "configs" / "demo.yaml"),  # package data, from the installed package
                     str(site / "teacher_cache" / "weights" / "vit_demo_shape.safetensors")]
    installed = _files(site)
    work = tmp_path / "work"
    work.mkdir()
    hakd = [sys.executable, str(site / "bin" / "hakd")]
    run = subprocess.run([*hakd, "run", "--out", "rel", *TINY], cwd=work, env=env, capture_output=True, text=True,
                         timeout=1800)
    assert run.returncode == 0, run.stderr[-3000:]  # its analysis's Ray tasks read the models by path
    assert os.listdir(work) == ["rel"]
    assert (work / "rel" / "report" / "report.md").is_file() and (work / "rel" / "cache" / "vit_demo.zarr").is_dir()
    info = json.loads((work / "rel" / "run.json").read_text())
    assert info["versions"]["hakd"] == "0.1.0" and info["commit"] == "not a git checkout"
    assert _files(site) == installed  # nothing written into the installed package
