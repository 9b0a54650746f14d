"""Add a benchmark's line, or why it has none, to a results file: what infra/bench/gpu.sh does after each run.

  python -m infra.bench.merge RESULTS KEY --line-from FILE --rc N --why TEXT
      the last JSON line of FILE under benches.KEY; if FILE holds none (the run was killed or crashed
      before printing it), {"error": "no result line: exit status N (TEXT)"}
  python -m infra.bench.merge RESULTS KEY [KEY ...] --rc N --why TEXT
      {"error": "did not finish: exit status N (TEXT)"} for each KEY the file does not hold yet (the
      benches a killed `infra.bench.run gpu` was running or never reached)

RESULTS is created if the run that should have written it died first. The file is replaced whole
(a temporary file, then a rename), so a reader never sees half of it.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
from pathlib import Path

HEADER = ("device", "device_name", "profile", "commit", "versions")  # what a results file takes from a bench line


def last_line(path: Path) -> dict | None:
    """The last line of `path` that is a JSON object, or None."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    for raw in reversed(text.splitlines()):
        try:
            line = json.loads(raw)
        except ValueError:
            continue
        if isinstance(line, dict):
            return line
    return None


def merge(results: Path, entries: dict[str, dict]) -> dict:
    """Put `entries` (key -> bench line) into the results file's benches; returns the document written."""
    from infra.provenance import commit
    results = Path(results)
    if results.exists():
        doc = json.loads(results.read_text())
    else:
        first = next(iter(entries.values()), {})
        doc = {"device": results.stem.rsplit("-", 3)[0],  # <device>-<yyyy>-<mm>-<dd>.json
               "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d"), "commit": commit(),
               **{k: first[k] for k in HEADER if k in first}, "benches": {}}
    doc.setdefault("benches", {}).update({k: {**v, "bench": k} for k, v in entries.items()})
    results.parent.mkdir(parents=True, exist_ok=True)
    tmp = results.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, results)
    return doc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m infra.bench.merge", description=__doc__.split("\n")[0])
    ap.add_argument("results", type=Path)
    ap.add_argument("keys", nargs="+")
    ap.add_argument("--line-from", type=Path, help="file whose last JSON line is the result of KEY")
    ap.add_argument("--rc", type=int, required=True, help="the run's exit status")
    ap.add_argument("--why", default="", help="what the exit status means, e.g. 124 = hit BENCH_TIMEOUT=330 s")
    args = ap.parse_args(argv)
    why = f"exit status {args.rc}" + (f" ({args.why})" if args.why else "")
    if args.line_from is not None:
        if len(args.keys) != 1:
            ap.error("--line-from takes exactly one KEY")
        line = last_line(args.line_from)
        entries = {args.keys[0]: line if line is not None else {"error": f"no result line: {why}"}}
    else:
        held = json.loads(args.results.read_text()).get("benches", {}) if args.results.exists() else {}
        entries = {k: {"error": f"did not finish: {why}"} for k in args.keys if k not in held}
    if entries:
        merge(args.results, entries)
        for k, v in entries.items():
            print(f"merge: {k} {'error: ' + v['error'] if 'error' in v else 'added'} -> {args.results}",
                  file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
