"""The README's performance table, from every results file: `python -m infra.bench.table [DIR|FILE...]`.

One row per figure of every benchmark in every `infra/bench/results/*.json` (written by
`hakd bench all` and infra/bench/gpu.sh): device, date, commit, figure, value, target, met.
Figures are the numeric results of each JSON line (for the cache bench, per teacher); the
targets and the verdicts are the ones recorded in the file when it was measured.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
_NOT_FIGURES = {"versions", "params", "targets", "met", "seconds", "load_avg_1m"}


def figures(line: dict) -> list[tuple[str, float]]:
    """(dotted name, value) of every numeric result in a benchmark line, in the line's order."""
    out = []
    nested = {k for v in line.get("teachers", {}).values() for k in v}

    def walk(node: dict, prefix: str) -> None:
        for k, v in node.items():
            if not prefix and (k in _NOT_FIGURES or (k in nested and "teachers" in line)):
                continue
            name = f"{prefix}{k}"
            if isinstance(v, dict):
                walk(v, name + ".")
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                out.append((name, v))
    walk(line, "")
    return out


def _fmt(v: float) -> str:
    if isinstance(v, float) and abs(v) >= 1e4:
        return f"{v:.0f}"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def rows(doc: dict) -> list[list[str]]:
    device, date = doc.get("device", "?"), doc.get("date", "?")
    if doc.get("profile") not in (None, "cpu", "gpu"):
        device += f" ({doc['profile']})"
    commit = str(doc.get("commit", "?"))
    commit = commit[:8] + ("-dirty" if commit.endswith("-dirty") else "")
    out = []
    for bench, line in doc.get("benches", {}).items():
        skipped = line.get("skipped")
        if isinstance(skipped, str):  # the whole benchmark could not run
            out.append([device, date, commit, bench, f"skipped: {skipped}", "", ""])
            continue
        if "error" in line:  # the benchmark failed (infra/bench/run.py records the error and runs the rest)
            out.append([device, date, commit, bench, f"failed: {line['error']}", "", ""])
            continue
        targets, met = line.get("targets", {}), line.get("met", {})
        for name, value in figures(line):
            verdict = met.get(name)
            out.append([device, date, commit, f"{bench}: {name}", _fmt(value), targets.get(name, ""),
                        "" if verdict is None else ("yes" if verdict else "**no**")])
        for name, why in (skipped or {}).items():  # single figures that could not be measured
            out.append([device, date, commit, f"{bench}: {name}", f"skipped: {why}", targets.get(name, ""), ""])
    return out


def render(paths: list[Path]) -> str:
    docs = []
    for p in paths:
        try:
            docs.append(json.loads(Path(p).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            print(f"table: skipping {p}: {e}", file=sys.stderr)
    docs.sort(key=lambda d: (str(d.get("device")), str(d.get("date"))))
    head = ["device", "date", "commit", "figure", "value", "target", "met"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for d in docs:
        lines += ["| " + " | ".join(r) + " |" for r in rows(d)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    paths: list[Path] = []
    for a in args or [str(RESULTS_DIR)]:
        a = Path(a)
        paths += sorted(a.glob("*.json")) if a.is_dir() else [a]
    if not paths:
        print(f"no results files in {', '.join(args) or RESULTS_DIR}; run `hakd bench all` (or infra/bench/gpu.sh)",
              file=sys.stderr)
        return 1
    print(render(paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
