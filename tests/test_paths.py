"""Paths are resolved once, in the driver: hakd runs from any directory, and its digests do not move."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import TINY
from infra.config import config_from_dict, dump_config, load_config, resolve_paths

ROOT = Path(__file__).resolve().parent.parent
HAKD = Path(sys.executable).parent / "hakd"


def test_resolving_paths_leaves_every_digest_as_it_was(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("w.pt").write_bytes(b"")
    cfg = load_config(None, [*TINY, "data.root=data", "cache.location=shared/cache", "teacher_cnn.weights=w.pt"])
    resolved = resolve_paths(cfg)
    assert resolved.data.root == str(tmp_path / "data") and resolved.cache.location == str(tmp_path / "shared/cache")
    assert resolved.teacher_cnn.weights == str(tmp_path / "w.pt") and resolved.teacher_vit.weights is None
    assert resolved.given_paths == {"data.root": ["data", str(tmp_path / "data")],
                                    "cache.location": ["shared/cache", str(tmp_path / "shared/cache")],
                                    "teacher_cnn.weights": ["w.pt", str(tmp_path / "w.pt")]}
    from student_train.sweep import plan_trials, trial_config, trial_digest
    for sections in [(), ("data",), ("cache",), ("teacher_cnn", "data", "seed")]:
        assert resolved.digest(*sections) == cfg.digest(*sections)
    # what a Ray task rebuilds from the config it is sent, and what a trial records, are the same too
    assert config_from_dict(resolved.to_dict()).digest() == cfg.digest()
    assert [trial_digest(trial_config(resolved, t)) for t in plan_trials(resolved)] == \
           [trial_digest(trial_config(cfg, t)) for t in plan_trials(cfg)]
    # config.yaml keeps both forms, and read back it names the same run
    saved = yaml.safe_load(dump_config(resolved))
    assert saved["data"]["root"] == str(tmp_path / "data") and saved["given_paths"]["data.root"][0] == "data"
    again = resolve_paths(config_from_dict(saved))
    assert again.digest() == cfg.digest()
    saved["data"]["root"] = "/elsewhere"  # a path changed by hand is a change of the config
    assert config_from_dict(saved).digest() != cfg.digest()
    assert resolve_paths(resolved).given_paths == resolved.given_paths  # resolving twice changes nothing


def test_urls_and_absolute_paths_are_left_as_they_are():
    cfg = load_config(None, ["cache.location=s3://bucket/prefix", "data.root=/srv/data"])
    resolved = resolve_paths(cfg)
    assert resolved.cache.location == "s3://bucket/prefix" and resolved.data.root == "/srv/data"
    assert resolved.given_paths == {}


def test_skipping_unreadable_files_or_joining_a_ray_cluster_is_not_a_config_change():
    plain = load_config(None, []).digest()
    assert load_config(None, ["data.skip_unreadable=true"]).digest() == plain
    assert load_config(None, ["ray.address=auto", "ray.num_cpus=4"]).digest() == plain


def test_a_given_paths_entry_is_checked():
    from infra.config import ConfigError
    with pytest.raises(ConfigError, match="given_paths.data.nope"):
        config_from_dict({"given_paths": {"data.nope": ["a", "/b"]}})


@pytest.mark.slow
@pytest.mark.timeout(1200)  # an analysis through a subprocess: a minute or more on 2 shared cores
def test_hakd_analyze_from_another_directory_on_a_relative_out(tmp_path, tiny_run):
    """The issue's second case: `hakd analyze --out moved` on a finished run copied to a directory that is not
    the repository's root (its Ray tasks read the models by path). `hakd run --out rel` from such a directory is
    tests/test_install.py's case."""
    repo_before = set(os.listdir(ROOT))
    shutil.copytree(tiny_run, tmp_path / "moved", ignore=shutil.ignore_patterns("report", "logs"))
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    analyze = subprocess.run([str(HAKD), "analyze", "--out", "moved", *TINY], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=1100)
    assert analyze.returncode == 0, analyze.stderr[-3000:]
    assert json.loads((tmp_path / "moved" / "report" / "metrics.json").read_text())["accuracy"] == \
        json.loads((tiny_run / "report" / "metrics.json").read_text())["accuracy"]
    assert os.listdir(tmp_path) == ["moved"]
    assert "moved" not in set(os.listdir(ROOT)) - repo_before  # no stray `moved/` in the repository's root
