"""How the report shows a number: scales, rounding, mean ± spread over seeds, and JSON-safe values."""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np


class Scale(NamedTuple):
    """How a quantity is shown: value * factor, rounded to `decimals`, then `suffix`; differences in `unit`."""
    factor: float
    decimals: int
    suffix: str
    unit: str


PERCENT = Scale(100, 2, "%", " points")
FRACTION = Scale(1, 3, "", "")


def value(x) -> float:
    """A float, nan for None or anything missing."""
    return float("nan") if x is None else float(x)


def shown(x, scale: Scale) -> float:
    return round(value(x) * scale.factor, scale.decimals)


def fmt(x, scale: Scale = FRACTION, suffix: bool = True) -> str:
    """The value as shown in tables and sentences; an em dash when not measured."""
    v = shown(x, scale)
    return f"{v:.{scale.decimals}f}{scale.suffix if suffix else ''}" if math.isfinite(v) else "—"


def fmt_diff(d: float, scale: Scale) -> str:
    """A signed difference with its unit: '+3.45 points'."""
    return f"{shown(d, scale):+.{scale.decimals}f}{scale.unit}"


def fmt_stat(stat: dict | None, scale: Scale = FRACTION, table: bool = False) -> str:
    """'mean ± std [lo, hi]' (table) or 'mean ± std (95% interval lo–hi)' (sentence) over seeds.

    One run (a teacher), or a value without stats, shows the value alone.
    """
    if not stat or stat.get("mean") is None:
        return "—"
    mean = fmt(stat["mean"], scale, suffix=not table)
    if stat.get("std") is None or stat.get("ci95") is None:
        return mean
    std = f"{shown(stat['std'], scale):.{scale.decimals}f}"
    lo, hi = (fmt(c, scale, suffix=False) for c in stat["ci95"])
    return f"{mean} ± {std} [{lo}, {hi}]" if table else f"{mean} ± {std} (95% interval {lo}–{hi})"


def eps_text(eps: float) -> str:
    """An L-inf budget as k/255 when it is one (the usual way to quote it), else as a decimal."""
    k = eps * 255
    return f"{round(k)}/255" if abs(k - round(k)) < 1e-6 else f"{eps:.4g}"


def jsonable(obj):
    """Plain JSON types: numpy scalars and arrays unwrapped, NaN and infinities as None."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
