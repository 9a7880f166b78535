"""Every code block of README.md and docs/ is executed, so that no example can rot.

- ```python blocks run in order, one namespace per document, in a fresh working folder;
  ```python file=NAME blocks are written to NAME there instead (a later command runs them).
- ```bash blocks: each command runs — ``gloro-fast …`` / ``python -m gloro_fast …`` through
  ``gloro_fast.cli.main`` (exit status 0), ``python SCRIPT`` and ``torchrun …`` as
  subprocesses, ``make TARGET`` is checked to be a Makefile target — unless the block's info
  string says ``parse-only`` (full-size recipes, GPU commands), or it is in README.md, whose
  command lines are full-size recipes: then every gloro-fast command line must parse
  (the torchrun options too) and every make target exist. A command of any other kind fails.
- docs/tutorials/ run in their numbered order in one shared folder: they build on each other.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gloro_fast import cli

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^([ \t]*)```([^\n`]*)\n(.*?)^\1```[ \t]*$", re.S | re.M)  # indented too
TUTORIALS = sorted((ROOT / "docs" / "tutorials").glob("*.md"))
OTHER_DOCS = [ROOT / "README.md"] + sorted(p for p in (ROOT / "docs").glob("*.md"))
TORCHRUN_FLAGS = {"--nproc_per_node", "--nproc-per-node", "--nnodes", "--node_rank", "--node-rank",
                  "--master_addr", "--master-addr", "--master_port", "--master-port", "--rdzv_backend",
                  "--rdzv-backend", "--rdzv_endpoint", "--rdzv-endpoint"}
TORCHRUN_SWITCHES = {"--standalone"}


def code_blocks(path: Path):
    """(language, options, code, line) of every fenced block that names a language."""
    text = path.read_text(encoding="utf-8")
    for match in FENCE.finditer(text):
        info = match.group(2).split()
        if not info:
            continue
        line = text.count("\n", 0, match.start()) + 1
        yield info[0], info[1:], textwrap.dedent(match.group(3)), line


def commands(code: str):
    """The commands of a bash block: continuation lines joined, comments and blanks dropped."""
    for line in code.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if words:
            yield words


def split_env(words):
    env = {}
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
        key, value = words[0].split("=", 1)
        env[key] = value
        words = words[1:]
    return env, words


def make_targets():
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    return set(re.findall(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", text, re.M))


def parse_gloro(args, where):
    try:
        cli.build_parser().parse_args(args)
    except (SystemExit, Exception) as exc:  # the parser's one-line usage error
        pytest.fail(f"{where}: `gloro-fast {' '.join(args)}` does not parse: {exc}")


def torchrun_parts(words, where):
    """(torchrun options, the program: ["-m", module, ...] or [script, ...])."""
    options, i = [], 1
    while i < len(words) and words[i].startswith("--"):
        flag = words[i].split("=", 1)[0]
        if flag in TORCHRUN_SWITCHES or "=" in words[i]:
            options.append(words[i])
            i += 1
        elif flag in TORCHRUN_FLAGS and i + 1 < len(words):
            options += words[i:i + 2]
            i += 2
        else:
            pytest.fail(f"{where}: unknown torchrun option {words[i]}")
    if i >= len(words):
        pytest.fail(f"{where}: torchrun without a program")
    return options, words[i:]


def run_bash(code, where, cwd: Path, parse_only: bool, monkeypatch):
    for words in commands(code):
        env, words = split_env(words)
        program = words[0]
        if program == "gloro-fast" or words[:3] == ["python", "-m", "gloro_fast"]:
            args = words[1:] if program == "gloro-fast" else words[3:]
            parse_gloro(args, where)
            if not parse_only:
                with monkeypatch.context() as m:
                    for key, value in env.items():
                        m.setenv(key, value)
                    assert cli.main(args) == 0, f"{where}: `gloro-fast {' '.join(args)}` failed"
        elif program == "make":
            missing = set(words[1:]) - make_targets()
            assert not missing, f"{where}: no Makefile target {sorted(missing)}"
        elif program == "torchrun":
            options, target = torchrun_parts(words, where)
            if target[:2] == ["-m", "gloro_fast"]:
                parse_gloro(target[2:], where)
            if not parse_only:
                subprocess.run([sys.executable, "-m", "torch.distributed.run", *options, *target],
                               cwd=cwd, env={**os.environ, **env}, check=True, timeout=900)
        elif program == "python":
            if parse_only:
                continue
            subprocess.run([sys.executable, *words[1:]], cwd=cwd, env={**os.environ, **env},
                           check=True, timeout=900)
        else:
            pytest.fail(f"{where}: a bash block runs `{program}`, which the docs test cannot check")


def run_document(path: Path, cwd: Path, monkeypatch, bash_parse_only: bool = False):
    monkeypatch.chdir(cwd)
    namespace = {"__name__": f"docs:{path.name}"}
    ran = 0
    for language, options, code, line in code_blocks(path):
        where = f"{path.relative_to(ROOT)}:{line}"
        if language == "python":
            files = [o.split("=", 1)[1] for o in options if o.startswith("file=")]
            if files:
                (cwd / files[0]).write_text(code, encoding="utf-8")
            else:
                exec(compile(code, where, "exec"), namespace)
            ran += 1
        elif language in ("bash", "sh", "shell"):
            run_bash(code, where, cwd, bash_parse_only or "parse-only" in options, monkeypatch)
            ran += 1
    return ran


@pytest.fixture(scope="module")
def tutorial_folder(tmp_path_factory):
    return tmp_path_factory.mktemp("tutorials")


def test_the_docs_have_tutorials():
    names = [p.name for p in TUTORIALS]
    assert len(names) >= 6 and names == sorted(names)


@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.stem)
def test_tutorial(path, tutorial_folder, monkeypatch):
    assert run_document(path, tutorial_folder, monkeypatch) > 0


@pytest.mark.parametrize("path", OTHER_DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_document(path, tmp_path, monkeypatch):
    run_document(path, tmp_path, monkeypatch, bash_parse_only=path.name == "README.md" and path.parent == ROOT)


LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|<(https?://[^>]+)>|(?<![(<\w])(https?://\S+)")


@pytest.mark.parametrize("path", [ROOT / "README.md"] + sorted((ROOT / "docs").rglob("*.md")),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_links_stay_in_the_repository(path):
    """README and docs link nothing outside the repository, and every relative link resolves."""
    text = path.read_text(encoding="utf-8")
    text = FENCE.sub("", text)   # code blocks are not links
    for match in LINK.finditer(text):
        target = next(g for g in match.groups() if g)
        assert not re.match(r"[a-z][a-z0-9+.-]*:", target), f"{path.name}: external link {target}"
        file = target.split("#", 1)[0]
        if file:
            assert (path.parent / file).resolve().exists(), f"{path.name}: broken link {target}"
            assert ROOT in (path.parent / file).resolve().parents, f"{path.name}: link leaves the repository"
