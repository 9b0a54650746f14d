"""`hakd cache --dry-run`: the sizes of the stores and the writers' buffers, before any work; nothing written."""
from __future__ import annotations

import re

import numpy as np
import torch

from infra.cli import main as cli_main
from teacher_cache.job import ROLES
from cache_helpers import SMALL, small_cfg


def test_cache_dry_run_prints_sizes(tmp_path, capsys):
    from teacher_cache.fit import build_teacher
    out = tmp_path / "out"
    assert cli_main(["cache", "--dry-run", "--out", str(out), *SMALL]) == 0
    text = capsys.readouterr().out
    assert not out.exists()  # a dry run writes nothing
    cfg = small_cfg()
    k = cfg.cache.views
    assert f"N = 64 images x K = {k} views" in text
    assert text.count("of shared memory per unit, writers + 1 units per cache actor: cache.writers auto") == 2
    row = re.compile(r"^\s+(\S+)\s+(\(.*?\))\s+([\d,]+)\s+([\d.,]+ [KMGT]?B)\s+([\d.,]+ [KMGT]?B)$", re.M)
    rows = row.findall(text)
    feats = [r for r in rows if r[0].startswith("features/")]
    assert len(feats) == 2, text
    for role, (name, shape, per_sample, raw, est) in zip(ROLES, feats):
        teacher = build_teacher(cfg, role).eval()
        (layer,) = teacher.default_layers()
        assert name == f"features/{layer}"
        with torch.no_grad():
            real = tuple(teacher.extract(torch.zeros(1, 3, teacher.input_size, teacher.input_size), [layer])[layer].shape[1:])
        assert shape == str((k, *real))
        assert int(per_sample.replace(",", "")) == k * int(np.prod(real)) * 2
    images = [r for r in rows if r[0] == "images"]
    assert images and all(int(r[2].replace(",", "")) == 32 * 32 * 3 for r in images)
    logits = [r for r in rows if r[0] == "logits"]
    assert logits and all(int(r[2].replace(",", "")) == k * 10 * 2 for r in logits)
    assert len(re.findall(r"^\s+total\s+\S+ \S*B\s+\S+ \S*B$", text, re.M)) == 2
    assert re.search(r"all stores: [\d.,]+ [KMGT]?B uncompressed, about [\d.,]+ [KMGT]?B stored", text)


def test_dry_run_json_totals_stores_packed_file_and_teachers(capsys):
    """`--json` is one object whose total adds every part, and the packed rows hold what the stores hold per view."""
    import json
    assert cli_main(["cache", "--dry-run", "--json", *SMALL]) == 0
    plan = json.loads(capsys.readouterr().out)
    cfg = small_cfg()
    n, k, s = plan["images"], plan["views"], cfg.data.image_size
    assert (n, k) == (64, cfg.cache.views)
    per_view = sum(a["bytes_per_image"] // k for st in plan["stores"].values()
                   for name, a in st["arrays"].items() if name not in ("images", "labels", "views"))
    assert plan["packed"]["row_bytes"] == s * s * 3 + 5 * 4 + 16 + per_view
    assert plan["packed"]["rows"] == n * k and plan["packed"]["bytes"] >= n * k * plan["packed"]["row_bytes"]
    stored = sum(st["stored_bytes"] for st in plan["stores"].values())
    assert plan["total_bytes"] == stored + plan["packed"]["bytes"] + sum(plan["teachers"].values())
    assert all(b > 0 for b in plan["teachers"].values())
