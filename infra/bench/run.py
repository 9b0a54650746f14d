"""Run the benchmarks: `hakd bench {cache,loader,train,analyze,all}` or `python -m infra.bench.run`.

Each benchmark prints one JSON line on stdout (progress goes to stderr). `all` runs the four and
writes `<results>/<device>-<date>.json` (default results dir: infra/bench/results/, or the system
temp dir for the tiny profile; `hakd bench all --out DIR` writes there instead). `gpu` is the set
infra/bench/gpu.sh runs: cache, train, loader. `python -m infra.bench.run` also takes a comma-separated
list of benchmarks and sets (`cache,train`; `cache,` is a list of one): they run in the usual order
(cache, train, loader, analyze) and are written to the results file like a set.

A benchmark that fails does not stop the others: its line is {"error": "<one line>"} (the traceback
goes to stderr), the results file is rewritten after every benchmark, and the exit status is 1 at
the end if any failed (2 for bad arguments).

Trailing `key=value` arguments override fields of the machine's profile (infra/bench/profiles.py),
e.g. `hakd bench train repeats=5 train_batch=32`; `profile=cpu|gpu|tiny` and `device=cpu|cuda` pick
the profile and the device (default: the GPU profile when torch sees a GPU, else the CPU one). `python -m infra.bench.run` also takes
--device cpu|cuda, --profile cpu|gpu|tiny, --tiny (= --profile tiny) and --copy-to DIR ($OUT).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

from infra.bench.common import Context, device_slug, emit, header, log, missing_modules
from infra.bench.profiles import Profile, resolve_profile
from infra.errors import UserError

RESULTS_DIR = Path(__file__).resolve().parent / "results"
NEEDS = {"cache": ["torch", "timm", "zarr", "numcodecs"], "train": ["torch", "timm", "zarr", "numcodecs"],
         "loader": ["torch", "timm", "zarr", "numcodecs", "ffcv"],
         "analyze": ["torch", "timm", "pytorch_grad_cam", "scipy"]}  # + ray for the CPU profiles' worker figures
SETS = {"all": ["cache", "train", "loader", "analyze"], "gpu": ["cache", "train", "loader"]}
ORDER = ["cache", "train", "loader", "analyze"]  # train before loader: it measures the student's rate


def bench_names(what: str) -> list[str]:
    """The benchmarks `what` names: one, a set (all, gpu) or a comma-separated list of those."""
    names = []
    for w in filter(None, what.split(",")):  # `cache,`: a list of one, which writes a results file
        if w not in SETS and w not in ORDER:
            raise UserError(f"unknown benchmark {w!r} in {what!r}; name one or more (comma-separated) of "
                            f"{', '.join([*ORDER, *SETS])}")
        names += SETS.get(w, [w])
    if not names:
        raise UserError(f"no benchmark in {what!r}; name one or more (comma-separated) of {', '.join([*ORDER, *SETS])}")
    return names


def writes_results(what: str) -> bool:
    """A set or a list writes a results file; one benchmark only prints its line."""
    return what in SETS or "," in what


def run_one(name: str, ctx: Context) -> dict:
    if name == "analyze":
        from infra.bench import analyze
        return analyze.run(ctx.p, ctx.dir)
    module = __import__(f"infra.bench.{name}", fromlist=["run"])
    return module.run(ctx)


def one_line(e: BaseException, limit: int = 300) -> str:
    """`Type: first line of the message`, at most `limit` characters: what a results file records of a failure."""
    first = next((l.strip() for l in str(e).splitlines() if l.strip()), "")
    text = f"{type(e).__name__}: {first}" if first else type(e).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def run_set(names: list[str], p: Profile, results_dir: Path | None, copy_to: Path | None = None,
            keep: Path | None = None) -> list[dict]:
    """Run the named benchmarks in one context; print a line each (an error line for one that failed);
    write the results file after each if asked."""
    lines = []
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="hakd-bench-", dir=keep) as tmp:
        ctx = Context(p, Path(tmp))
        for name in [n for n in ORDER if n in names]:
            missing = missing_modules(NEEDS[name])
            if missing:
                line = {**header(name, p), "skipped": f"missing Python modules: {', '.join(missing)}"}
                log(f"{name}: skipped, missing {', '.join(missing)}")
            else:
                t0 = time.time()
                try:
                    with contextlib.redirect_stdout(sys.stderr):  # stray prints must not break the JSON lines
                        line = run_one(name, ctx)
                except Exception as e:  # a GPU session is short: one failure must not cost the others their run
                    traceback.print_exc(file=sys.stderr)
                    line = {**header(name, p), "error": one_line(e)}
                    log(f"{name}: FAILED ({line['error']}); going on with the rest")
                if "error" in line:  # the failed bench's tensors are garbage now: give their device memory back
                    gc.collect()
                    if p.device == "cuda":
                        import torch
                        torch.cuda.empty_cache()
                line["seconds"] = round(time.time() - t0, 1)
            emit(line)
            lines.append(line)
            if results_dir is not None:  # after every benchmark: a run cut short keeps what it measured
                path = write_results(lines, p, results_dir, round(time.time() - start, 1), ctx.memo)
                log(f"results written to {path}")  # gpu.sh takes the path from the last such line
                if copy_to is not None:
                    copy_to.mkdir(parents=True, exist_ok=True)
                    shutil.copy(path, copy_to / path.name)
    return lines


def results_file(p: Profile, results_dir: Path) -> Path:
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    return Path(results_dir) / f"{device_slug(p.device)}-{date}.json"


def write_results(lines: list[dict], p: Profile, results_dir: Path, seconds: float, memo: dict | None = None) -> Path:
    from infra.provenance import commit
    from infra.provenance import now, versions
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_file(p, results_dir)
    date, device = path.stem[-10:], device_slug(p.device)
    doc = {"device": device, "device_name": lines[0].get("device_name") if lines else device, "date": date,
           "created": now(), "commit": commit(), "profile": p.name, "versions": versions(),
           "seconds": seconds, "benches": {line["bench"]: line for line in lines}}
    if memo and "calibration" in memo:  # the random teachers' activation scales before and after calibration
        doc["teacher_calibration"] = memo["calibration"]
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def main(args) -> int:
    """Entry from `hakd bench` (infra/cli.py): args.what, args.out, args.overrides, args.config."""
    from infra.config import DEFAULT_OUT
    if getattr(args, "config", None):
        log("--config is not used by bench: models and sizes come from the machine's profile "
            "(override fields as key=value)")
    profile, device, rest = getattr(args, "profile", "auto"), getattr(args, "device", "auto"), []
    for o in args.overrides:  # `hakd bench all profile=tiny device=cpu` (the hakd parser has no such flags)
        key, _, value = o.partition("=")
        if key == "profile":
            profile = value
        elif key == "device":
            device = value
        else:
            rest.append(o)
    if device not in ("auto", "cpu", "cuda"):
        raise UserError(f"bench: device={device} is not one of auto, cpu, cuda")
    p = resolve_profile(profile, device, rest)
    names = bench_names(args.what)
    results = None
    if writes_results(args.what):
        out = getattr(args, "out", None)
        if out and out != DEFAULT_OUT:
            results = Path(out)
        elif p.name in ("cpu", "gpu"):
            results = RESULTS_DIR
        else:  # tiny figures are checks of the code, never results: keep them out of the repository
            results = Path(tempfile.gettempdir()) / "hakd-bench-results"
    if getattr(args, "results_path", False):  # gpu.sh: where to record benches whose run died before writing
        if results is None:
            raise UserError(f"--results-path: `{args.what}` writes no results file (only {', '.join(SETS)} "
                            f"and comma-separated lists do)")
        print(results_file(p, results))
        return 0
    log(f"profile {p.name} on {device_slug(p.device)}: {', '.join(n for n in ORDER if n in names)}")
    lines = run_set(names, p, results, copy_to=getattr(args, "copy_to", None))
    failed = [line["bench"] for line in lines if "error" in line]
    if failed:
        log(f"failed: {', '.join(failed)} (their lines hold the error; the others ran)")
    return 1 if failed else 0


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m infra.bench.run", description=__doc__.split("\n")[0])
    ap.add_argument("what", help=f"one of {', '.join([*ORDER, *SETS])}, or several, comma-separated (cache,train)")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--profile", default="auto", choices=("auto", "cpu", "gpu", "tiny"))
    ap.add_argument("--tiny", action="store_true", help="the tiny profile: every code path in seconds")
    ap.add_argument("--out", default=None, help=f"results directory for all/gpu (default {RESULTS_DIR})")
    ap.add_argument("--copy-to", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None,
                    help="also copy the results file here (default: $OUT when set)")
    ap.add_argument("--results-path", action="store_true",
                    help="print the results file that this command writes, and exit")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    return ap


def cli(argv: list[str] | None = None) -> int:
    args = _parser().parse_intermixed_args(argv)
    if args.tiny:
        args.profile = "tiny"
    args.config = None
    try:
        return main(args)
    except UserError as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
