"""The commit a copied working tree was made from: `python -m infra.bench.stamp` before the copy.

The GPU machine gets a copy of the working tree (tracked files and untracked, not ignored ones) but
not this checkout's git state: `git rev-parse HEAD` there named another commit (d3ccd8c-dirty for a
tree copied at fd87b1f). So before each device call, the stamp is written here: HEAD, whether the
tracked files differ from it, and a git blob hash of every tracked file as it is now. It lies in
`infra/bench/source-stamp.json`, untracked and not ignored, so it travels with the tree.

`infra.provenance.commit()`, which every output's provenance records, believes the stamp only where git
names no clean commit and every tracked file the stamp lists still hashes the same, so a stamp left
behind after a commit or an edit is ignored.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from infra.provenance import ROOT, STAMP, blob_hash, git_commit, stamped_commit


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True,
                          timeout=10).stdout


def write_stamp(stamp: Path = STAMP) -> dict:
    """Record HEAD, its dirtiness and every tracked file's blob hash (needs git: run it in the checkout)."""
    files = [f for f in _git("ls-files", "-z").split("\0") if f]
    doc = {"commit": _git("rev-parse", "HEAD").strip(),
           "dirty": bool(_git("status", "--porcelain", "--untracked-files=no").strip()),
           "files": {f: blob_hash(ROOT / f) for f in files}}
    stamp.write_text(json.dumps(doc, indent=0, sort_keys=True) + "\n")
    return doc


def main(argv: list[str]) -> int:
    if argv == ["--check"]:  # gpu.sh, on the machine the tree was copied to: which commit will be recorded
        stamped = stamped_commit()
        if stamped:
            print(f"commit {stamped} (from {STAMP.relative_to(ROOT)}, which matches every tracked file)")
        else:
            print(f"commit {git_commit()} (from git: {STAMP.relative_to(ROOT)} is "
                  f"{'stale' if STAMP.exists() else 'missing'}; on a copied tree git may name another commit: "
                  f"run `python -m infra.bench.stamp` in the checkout before copying)")
        return 0
    if argv:
        print("usage: python -m infra.bench.stamp [--check]", file=sys.stderr)
        return 2
    d = write_stamp()
    print(f"{STAMP.relative_to(ROOT)}: {d['commit']}{'-dirty' if d['dirty'] else ''}, {len(d['files'])} tracked files")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
