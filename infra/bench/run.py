"""Run the benchmarks: `hakd bench [--results DIR] WHAT [key=value ...]`.

WHAT is one benchmark, `all`, or a comma-separated list (loader brings train, whose figure it is judged by), run
in the order of BENCHES in one context (one bench cache), each printing one JSON line on stdout (progress on
stderr). DIR/<device>-<profile>-<date>-<commit>.json (default DIR: ./bench-results) is rewritten around every
benchmark, those still to run marked unfinished, so a run stopped midway keeps what it measured and says what it
did not; a later run at the same commit and day adds to it. A failing benchmark is one line {"error": ...} (its
traceback on stderr), the others still run, exit status 1. `key=value` overrides fields of the machine's profile
(infra/bench/profiles.py); `profile=cpu|gpu|tiny` and `device=cpu|cuda` pick them (default: gpu if torch sees one).
"""
from __future__ import annotations

import contextlib
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

from infra.bench.common import Context, machine, free_device_memory, header, log
from infra import storage
from infra.bench.profiles import Profile, resolve_profile
from infra.errors import UserError
from infra.failures import describe

DEFAULT_RESULTS = "bench-results"
BENCHES = ("cache", "train", "loader", "cache_shm", "codecs", "analyze")  # run in this order


def bench_names(what: str) -> list[str]:
    """The benchmarks `what` names (one, `all`, or a comma-separated list), in the order they run."""
    names = set(BENCHES) if what == "all" else set(filter(None, what.split(",")))
    unknown = names - set(BENCHES)
    if unknown or not names:
        raise UserError(f"unknown benchmark {', '.join(sorted(unknown)) or what!r}; name one or more "
                        f"(comma-separated) of {', '.join(BENCHES)}, or all")
    if "loader" in names:  # judged against the student's rate, which the train bench measures
        names.add("train")
    return [n for n in BENCHES if n in names]


def run_one(name: str, ctx: Context) -> dict:
    from infra.bench import analyze, cache, codecs, loader, train
    if name == "analyze":
        return analyze.run(ctx.p, ctx.dir)
    if name == "cache_shm":  # the cache bench with its stores in RAM: the pipeline without the disk
        return {**cache.run(ctx, "/dev/shm"), "bench": "cache_shm"}
    return {"cache": cache, "train": train, "loader": loader, "codecs": codecs}[name].run(ctx)


def run_set(names: list[str], p: Profile, results: Path) -> list[dict]:
    """Run the named benchmarks in one context; print a line each; rewrite the results file before and after each."""
    from infra.provenance import commit, now, source_digest, versions
    c, slug = commit(), machine(p.device)[0]
    path = results / f"{slug}-{p.name}-{now()[:10]}-{c[:7]}{'-dirty' if c.endswith('-dirty') else ''}.json"
    doc = json.loads(path.read_text()) if path.exists() else {"benches": {}}  # same commit and day: add to it
    doc.update(device=slug, date=now()[:10], created=now(), commit=c, source_digest=source_digest(), profile=p.name,
               versions=versions())
    doc["benches"].update({n: {"bench": n, "error": "did not finish: the run stopped before it ended"} for n in names})
    lines = []
    with tempfile.TemporaryDirectory(prefix="hakd-bench-") as tmp:
        ctx = Context(p, Path(tmp), results=Path(results))
        for name in names:
            storage.write_bytes(path, (json.dumps(doc, indent=2) + "\n").encode())
            t0 = time.time()
            try:  # a module missing on a bare GPU machine fails its benchmarks alone, naming the module
                with contextlib.redirect_stdout(sys.stderr):  # stray prints must not break the JSON lines
                    line = run_one(name, ctx)
            except Exception as e:  # one failure must not cost the others their run
                traceback.print_exc(file=sys.stderr)
                line = {**header(name, p), "error": describe(e)[0]}
                log(f"{name}: FAILED ({line['error']}); going on with the rest")
                free_device_memory(p.device)  # the failed bench's tensors are garbage now
            line["seconds"] = round(time.time() - t0, 1)
            print(json.dumps(line), flush=True)  # the one line on stdout
            lines.append(line)
            doc["benches"][name] = line
            doc["teacher_calibration"] = ctx.memo.get("calibration")  # the random teachers' scales, calibrated
        storage.write_bytes(path, (json.dumps(doc, indent=2) + "\n").encode())
    log(f"results in {path}")
    return lines


def main(args) -> int:
    """Entry of `hakd bench` (infra/cli.py): args.what, args.results, args.overrides."""
    p = resolve_profile(args.overrides)
    names = bench_names(args.what)
    log(f"profile {p.name} on {machine(p.device)[1]}: {', '.join(names)}")
    lines = run_set(names, p, Path(args.results))
    failed = [line["bench"] for line in lines if "error" in line]
    if failed:
        log(f"failed: {', '.join(failed)} (their lines hold the error; the others ran)")
    return 1 if failed else 0
