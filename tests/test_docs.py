"""The README is a front page and docs/ holds the rest: every link resolves, every command runs.

Checks README.md and docs/*.md: the README's length and its links into docs/, that every relative link (and its
#anchor) names a file and heading in the repository, that no path points outside the repository, that every
`hakd ...` command parses with the CLI's own parser and its key=value overrides name config (or bench profile)
fields, that every `python -m` module, `make` target and `bash` script exists, and that every repository path
quoted in backticks exists.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
SPAN = re.compile(r"`([^`\n]+)`")
FILE_SUFFIXES = {"beton", "json", "jsonl", "yaml", "md", "html", "pt", "npz", "zarr", "py", "sh", "safetensors"}
REPO_PATH = re.compile(r"^(?:infra|teacher_cache|student_train|analysis|tests|examples|docs)/[\w./-]*[\w/]$")


def _text(page: Path) -> str:
    return page.read_text(encoding="utf-8")


def _prose(text: str) -> str:
    """The page without its fenced code blocks (links and anchors live in prose)."""
    return FENCE.sub("", text)


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    out = set()
    for line in _prose(_text(page)).splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            out.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return out


def _commands(text: str) -> list[str]:
    """Every command line of a code block, and every inline code span that is a command."""
    lines = [ln for block in FENCE.findall(text) for ln in block.splitlines()]
    lines += SPAN.findall(_prose(text))
    out = []
    for ln in lines:
        ln = ln.split(" #")[0].strip()
        ln = re.sub(r"^(?:\.venv/bin/|\$\(BIN\)/)", "", ln)
        ln = re.sub(r"^torchrun (?:--\S+ )*-m infra\.cli ", "hakd ", ln)  # torchrun runs the same CLI
        if re.match(r"(hakd|make|bash|python -m|\S*python\S* -m) ", ln):
            out.append(ln)
    return out


def test_readme_is_a_front_page():
    readme = _text(ROOT / "README.md")
    assert len(readme.splitlines()) <= 250, "README.md is the front page: keep it under 250 lines, move detail to docs/"
    assert readme.lstrip().startswith("# "), "README.md opens with its title"
    first_block = FENCE.search(readme).group(1)
    assert re.findall(r"^make (\w+)", first_block, re.M) == ["demo", "test"]
    docs_links = {m for m in LINK.findall(readme) if m.split("#")[0].startswith("docs/")}
    assert len({m.split("#")[0] for m in docs_links}) >= 4


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_links_resolve(page):
    for target in LINK.findall(_prose(_text(page))):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        assert dest.is_relative_to(ROOT), f"{page.name}: {target} points outside the repository"
        assert dest.exists(), f"{page.name}: link {target} names no file"
        if anchor and dest.suffix == ".md":
            assert anchor in _anchors(dest), f"{page.name}: link {target}: no such heading in {path or page.name}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_path_outside_the_repository(page):
    assert "../shared" not in _text(page)
    for span in SPAN.findall(_text(page)):
        assert not span.startswith(("/work", "../")), f"{page.name}: `{span}` is outside the repository"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_quoted_paths_exist(page):
    for span in SPAN.findall(_prose(_text(page))):
        if REPO_PATH.match(span) and not any(c in span for c in "<>*{|"):
            assert (ROOT / span).exists(), f"{page.name}: `{span}` does not exist"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_config_keys_exist(page):
    """Every `section.key` the page quotes (`cache.codec`, `teacher_*.weights`, `sweep.train.kd_lambda=...`) is a field."""
    from infra.config import Config

    cfg = Config()
    fields = {f.name: {g.name for g in dataclasses.fields(getattr(cfg, f.name))}
              for f in dataclasses.fields(cfg) if dataclasses.is_dataclass(getattr(cfg, f.name))}
    fields["teacher_*"] = fields["teacher_vit"]
    quoted = SPAN.findall(_prose(_text(page))) + [ln for block in FENCE.findall(_text(page)) for ln in block.split()]
    for span in quoted:
        for section, key in re.findall(r"(?:^|[\s'(\[]|sweep\.)(teacher_\*|[a-z_]+)\.([a-z_]+)(?=$|[=:,)\]'])", span):
            if section in fields and key not in FILE_SUFFIXES:  # `data.beton` is a file
                assert key in fields[section], f"{page.name}: `{span}`: {section}.{key} is no config field"


def _check_module(module: str, where: str) -> None:
    spec = importlib.util.find_spec(module)
    assert spec is not None, f"{where}: no module {module}"
    if module.split(".")[0] in ("infra", "teacher_cache", "student_train", "analysis"):  # ours: it must run
        assert "__main__" in Path(spec.origin).read_text(), f"{where}: {module} cannot be run with python -m"


def _check_hakd(argv: list[str], where: str) -> None:
    """Parse with the CLI's own parser; overrides must name config fields (bench's: profile fields)."""
    from infra.bench.profiles import Profile
    from infra.cli import build_parser
    from infra.config import load_config

    parser = build_parser()
    if "--help" in argv:  # parses up to --help, which exits 0
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args([a for a in argv[1:] if a != "--help"] + ["--help"])
        assert exit_.value.code == 0, f"{where} does not parse"
        return
    try:
        args = parser.parse_args(argv[1:])
    except SystemExit:
        pytest.fail(f"{where} does not parse")
    overrides = [o for o in getattr(args, "overrides", []) if "=" in o]
    if args.command == "bench":
        fields = {f.name for f in dataclasses.fields(Profile)} | {"profile", "device"}
        assert {o.split("=")[0] for o in overrides} <= fields, f"{where}: no such bench profile field"
    elif overrides or getattr(args, "config", None):
        load_config(args.config, overrides)  # unknown keys and bad values raise


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_commands_parse(page):
    from infra.cli import build_parser

    makefile = (ROOT / "Makefile").read_text()
    subcommands = next(a.choices for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for cmd in _commands(_text(page)):
        where = f"{page.name}: `{cmd}`"
        pattern = any(c in cmd for c in "<>|{}") or "..." in cmd  # `hakd <command> --help`, `hakd cache|train`
        argv = cmd.replace("'", " ").replace('"', " ").split() if pattern else shlex.split(cmd)
        if argv[0] == "make":
            assert re.search(rf"^{argv[1]}:", makefile, re.M), f"{where}: no such make target"
        elif argv[0] == "bash":
            assert argv[1].startswith("-") or (ROOT / argv[1]).is_file(), f"{where}: no such script"
        elif argv[0] != "hakd":
            _check_module(argv[argv.index("-m") + 1], where)
        else:
            if len(argv) > 1 and re.fullmatch(r"[a-z]+", argv[1]):
                assert argv[1] in subcommands, f"{where}: hakd has no such command"
            placeholder = pattern or any(re.fullmatch(r"[A-Z_]+", a) for a in argv)  # CONFIG OUT
            if not placeholder and (len(argv) != 2 or "--help" in argv):  # a bare `hakd train` only names one
                _check_hakd(argv, where)
