"""The `hakd` command line: cache, train, analyze, run (all three), verify, compare, bench.

Every subcommand takes --config PATH (default: the embedded demo), --out DIR (default runs/demo)
and trailing key.sub=value overrides. Bad input exits with status 2 and a message naming the
problem and the fix; a run that fails its checks leaves --out as it was. Every other failure is one line
too (an error in a Ray task as the task raised it, a full or read-only disk with its path), its traceback in
a log file the line names (infra/failures.py). Ctrl-C prints where the
stage stopped and exits with status 130; the same command resumes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from infra import failures
from infra.config import DEFAULT_OUT, ConfigError, load_config, resolve_paths
from infra.errors import Interrupted
from infra.exclusive import exclusive_out


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config (default: the embedded demo, infra/configs/demo.yaml)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default: {DEFAULT_OUT})")
    p.add_argument("--overwrite", action="store_true",
                   help="let a different config replace the results in --out that it changes (the rest is reused)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. train.epochs=3")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hakd", description=(
        "Offline-teacher knowledge distillation across architectures: cache teacher features once "
        "(Ray -> Zarr), train students from them (FFCV), analyse the students (Ray)."))
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("cache", help="fit the teachers and cache their features over K views (Ray -> Zarr)")
    _common(p)
    p.add_argument("--dry-run", action="store_true",
                   help="print the disk the run will take (stores, packed file, teachers), then stop")
    p.add_argument("--json", action="store_true", help="with --dry-run: print the plan as one JSON object")
    _common(sub.add_parser("train", help="pack the caches into FFCV and train the students"))
    _common(sub.add_parser("analyze", help="evaluate every model and write the report (Ray)"))
    _common(sub.add_parser("run", help="cache, train and analyze in order"))
    p = sub.add_parser("verify", help="check a cache store (or every store under --out): completeness, "
                                      "shapes, NaN/Inf, per-shard checksums")
    p.add_argument("stores", nargs="*", help="store paths (default: OUT/cache/*.zarr)")
    p.add_argument("--out", default=DEFAULT_OUT)
    p = sub.add_parser("compare", help="the same models in two finished runs: each measure's difference over "
                                       "the seeds and its Welch 95%% interval")
    p.add_argument("runs", nargs=2, metavar="OUT", help="two finished runs' --out directories (A, then B)")
    p.add_argument("--models", nargs="*", help="models to compare (default: every model in both reports)")
    p.add_argument("--json", action="store_true", help="print the rows as one JSON list")
    from infra.bench.run import BENCHES, DEFAULT_RESULTS
    p = sub.add_parser("bench", help="benchmarks; each prints one JSON line and the results go to a file")
    p.add_argument("what", help=f"one of {', '.join(BENCHES)}, all, or several, comma-separated (cache,train)")
    p.add_argument("--results", default=DEFAULT_RESULTS,
                   help=f"folder of the results file (default: ./{DEFAULT_RESULTS})")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="profile fields (infra/bench/profiles.py), profile=cpu|gpu|tiny, device=cpu|cuda")
    return parser


def _summary(rows: list[tuple[str, str, float, str]]) -> str:
    lines = [f"{'stage':<9} {'status':<8} {'seconds':>8}  output", "-" * 60]
    lines += [f"{s:<9} {st:<8} {sec:>8.1f}  {o}" for s, st, sec, o in rows]
    return "\n".join(lines)


def _run_stages(args, stages: list[str]) -> int:
    from infra import pipeline
    # absolute before any Ray task, actor or torchrun rank sees them: those run in other directories
    cfg = resolve_paths(load_config(args.config, args.overrides))
    out = Path(os.path.abspath(os.path.expanduser(args.out)))
    from student_train.distributed import check_launch, is_main
    check_launch(stages)
    if not is_main():  # under torchrun rank 0 alone checks OUT (and writes in it); the others wait for its packing
        return _stages(args, cfg, out, stages)
    pipeline.check_out(cfg, out, args.overwrite)
    if "analyze" in stages:  # a model the analysis would not find is refused before any stage works
        from analysis.models import model_runs
        model_runs(cfg)
    with exclusive_out(out):  # a second command on this OUT is refused, not interleaved
        return _stages(args, cfg, out, stages)


def _stages(args, cfg, out: Path, stages: list[str]) -> int:
    from infra import pipeline
    rows, seconds = [], {}
    outputs = {"cache": out / "cache", "train": out / "train", "analyze": out / "report" / "report.md"}
    for stage in stages:
        args.stage = stage  # names the log of a failure
        start = time.time()
        fn = {"cache": pipeline.stage_cache, "train": pipeline.stage_train, "analyze": pipeline.stage_analyze}[stage]
        kwargs = {"seconds": seconds} if stage == "analyze" else {}
        try:
            res = fn(cfg, out, overwrite=args.overwrite, **kwargs)
        except KeyboardInterrupt as e:  # one line, not a traceback: where it stopped and how to go on
            where = f" {e}" if isinstance(e, Interrupted) else ""
            print(f"\nhakd: interrupted in `hakd {stage}`{where}; run the same command again to resume",
                  file=sys.stderr)
            return 130
        seconds[stage] = round(time.time() - start, 1)
        rows.append((stage, res["status"], seconds[stage], str(outputs[stage]) + (f" ({res['note']})" if res.get("note") else "")))
    print("\n" + _summary(rows))
    if "analyze" in stages:
        print(f"\nreport: {out / 'report' / 'report.md'} (and report.html); metrics: {out / 'report' / 'metrics.json'}")
    return 0


def _verify(args) -> int:
    from teacher_cache.store import CacheStore
    paths = list(args.stores) or sorted((Path(args.out) / "cache").glob("*.zarr"))  # a store may be an s3:// URL
    if not paths:
        raise ConfigError(f"no stores given and none under {Path(args.out) / 'cache'}; run `hakd cache` first")
    bad = 0
    for p in paths:
        store = CacheStore.open(p)
        problems = store.verify()
        if store.attrs.get("fidelity"):  # the codec's measured error on the KD loss terms (student_train/fidelity.py)
            from student_train.fidelity import summary_line
            print(f"{p}: {summary_line(store.attrs['fidelity'])}")
        if problems:
            bad += 1
            print(f"{p}: {len(problems)} problem(s)")
            for pr in problems[:20]:
                print(f"  - {pr}")
            print("  fix: re-run `hakd cache` with the same config and --out; it rewrites exactly the damaged or "
                  "incomplete units and parameter groups")
        else:
            print(f"{p}: ok")
    return 1 if bad else 0


def _dry_run(args) -> int:
    from teacher_cache.sizing import disk_plan, render
    cfg = load_config(args.config, args.overrides)
    plan = disk_plan(cfg)
    print(json.dumps(plan) if args.json else render(plan, cfg))
    return 0


def _compare(args) -> int:
    from analysis.compare import compare, load_metrics, render
    rows = compare(*(load_metrics(r) for r in args.runs), models=args.models)
    print(json.dumps(rows) if args.json else render(rows, *args.runs))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # Ctrl-C must reach us as KeyboardInterrupt: Ray Tune's own handler would end the sweep as a failure
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    try:
        if args.command == "verify":
            return _verify(args)
        if args.command == "cache" and args.dry_run:
            return _dry_run(args)
        if args.command == "compare":
            return _compare(args)
        if args.command == "bench":
            from infra.bench.run import main as bench_main
            return bench_main(args)
        stages = {"cache": ["cache"], "train": ["train"], "analyze": ["analyze"],
                  "run": ["cache", "train", "analyze"]}[args.command]
        return _run_stages(args, stages)
    except Exception as e:  # one line (the traceback, where it helps, in a log the line names); infra/failures.py
        return failures.report(e, getattr(args, "out", None), getattr(args, "stage", args.command))


if __name__ == "__main__":
    sys.exit(main())
