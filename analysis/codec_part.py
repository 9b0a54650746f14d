"""The report's part on the cache's feature codec: per teacher, how its features were stored and what that
changed in the KD targets and loss terms (metrics.json meta.codec, measured by student_train/fidelity.py)."""
from __future__ import annotations

from pathlib import Path

from analysis.document import Heading, Para, Table


def codec_part(metrics: dict, out: Path, ctx) -> tuple[list, dict]:
    """A report part (analysis/report.py PARTS): a table of each teacher's codec, bytes per view and errors."""
    codec = metrics.get("meta", {}).get("codec") or {}
    if not codec:
        return [], {}
    rows = []
    for role, r in codec.items():
        b = r["bytes_per_view"]
        targets = ", ".join(f"{name} {err:.2%}" for name, err in r["targets"].items())
        terms = ", ".join(f"{name} {t['value_error']:.2%} / {t['grad_cosine']:.4f}" for name, t in r["terms"].items())
        rows.append([role, r["codec"], f"{b['total']:,}", f"{b['ratio_vs_float16']}x", targets, terms])
    return [Heading(2, "Cache: feature codec"),
            Para("How each teacher's features were stored, and what the stored form changed on "
                 f"{next(iter(codec.values()))['heldout_views']} held-out views: the relative error of each KD "
                 "target, and per loss term the relative error of its value / the cosine of its gradient at the "
                 "student's KD layer (exact float16 against decoded targets, one student initialised from the "
                 "config's seed). Bytes per view as the packed file holds them."),
            Table(["Teacher", "Codec", "Bytes per view", "Fewer feature bytes than float16",
                   "Target error", "Loss term: value error / gradient cosine"], rows)], {}
