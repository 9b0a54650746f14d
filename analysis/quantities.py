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


PERCENT = Scale(100, 1, "%", " points")  # one decimal: one image of 500 is 0.2%
FRACTION = Scale(1, 3, "", "")
COUNT = Scale(1, 0, "", "")


def value(x) -> float:
    """A float, nan for None or anything missing."""
    return float("nan") if x is None else float(x)


def shown(x, scale: Scale) -> float:
    return round(value(x) * scale.factor, scale.decimals)


def fmt(x, scale: Scale = FRACTION, suffix: bool = True, digits: int | None = None) -> str:
    """The value as shown in tables and sentences (to `digits` decimals, else the scale's); an em dash when
    not measured. Negative digits round to tens, hundreds..."""
    digits = scale.decimals if digits is None else digits
    v = round(value(x) * scale.factor, digits) + 0.0  # + 0.0: no "-0"
    return f"{v:.{max(0, digits)}f}{scale.suffix if suffix else ''}" if math.isfinite(v) else "—"


def digits_of(spread, scale: Scale) -> int:
    """The decimals that print a value to the digit of its spread's first significant figure, in shown units:
    66.0 ± 4.9 -> 0 (66 ± 5), 0.8123 ± 0.0123 -> 2 (0.81 ± 0.01), 71.6 ± 0.96 -> 0 (72 ± 1). The scale's own
    decimals without a spread (or a zero one)."""
    s = abs(value(spread)) * scale.factor
    if not math.isfinite(s) or s == 0:
        return scale.decimals
    d = math.floor(math.log10(s))
    if round(s, -d) >= 10 ** (d + 1):  # 0.96 rounds to 1.0: its first figure is one digit up
        d += 1
    return min(-d, 6)


def fmt_diff(d: float, scale: Scale, spread: float | None = None) -> str:
    """A signed difference with its unit, to the digit of `spread` (e.g. its interval's half-width): '+3 points'."""
    digits = digits_of(spread, scale) if spread is not None else scale.decimals
    text = fmt(d, scale, suffix=False, digits=digits)
    return ("+" + text if not text.startswith(("-", "—")) else text) + scale.unit


def fmt_stat(stat: dict | None, scale: Scale = FRACTION, table: bool = False) -> str:
    """'mean ± std [lo, hi]' (table) or 'mean ± std (95% interval lo–hi)' (sentence) over seeds, the mean
    printed to the digit of its standard deviation's first significant figure.

    One run (a teacher) shows the value alone; two runs show mean ± std without an interval (analysis/stats.py).
    """
    if not stat or stat.get("mean") is None:
        return "—"
    if stat.get("std") is None:
        return fmt(stat["mean"], scale, suffix=not table)
    digits = digits_of(stat["std"], scale)
    mean = fmt(stat["mean"], scale, suffix=not table, digits=digits)
    std = fmt(stat["std"], scale, suffix=False, digits=digits)
    if stat.get("ci95") is None:
        return f"{mean} ± {std}"
    lo, hi = (fmt(c, scale, suffix=False, digits=digits) for c in stat["ci95"])
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
