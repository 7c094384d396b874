"""The docs a newcomer follows: README command 1 installs what README's examples import, and every
relative link in README.md and docs/*.md leads to a file that exists."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
#: import name -> distribution name, where they differ
DIST = {"yaml": "pyyaml", "PIL": "pillow", "sklearn": "scikit-learn"}


def _readme() -> str:
    return (ROOT / "README.md").read_text(encoding="utf-8")


def _section(text: str, title: str) -> str:
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else None]


def _commands() -> list[str]:
    """README's two set-up commands (the command lines of its first bash block)."""
    block = re.search(r"```bash\n(.*?)```", _readme(), re.S).group(1)
    return [ln for ln in block.splitlines() if ln.strip() and not ln.startswith("#")]


def _extras_of_command_1() -> set[str]:
    first = _commands()[0]
    assert "xai-audit demo" in first, first
    for part in first.split("&&"):
        words = shlex.split(part)
        if words[:1] == [
            "scripts/install.sh"
        ]:  # scripts/install.sh EXTRAS: pip install -e .[EXTRAS]
            return set(filter(None, (words[1] if len(words) > 1 else "").split(",")))
        if "install" in words and "-e" in words:
            spec = words[words.index("-e") + 1]
            m = re.fullmatch(r"\.(?:\[(.*)\])?", spec)
            assert m, spec
            return set(filter(None, (m.group(1) or "").split(",")))
    raise AssertionError(f"no 'pip install -e' in command 1: {first}")


def _names(reqs) -> set[str]:
    return {re.split(r"[<>=\[;~! ]", r, maxsplit=1)[0].lower() for r in reqs}


def test_command_1_installs_what_reading_the_output_imports():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    installed = _names(project["dependencies"])
    for extra in _extras_of_command_1():
        installed |= _names(project["optional-dependencies"][extra])
    code = "\n".join(re.findall(r"```python\n(.*?)```", _section(_readme(), "Reading the output"),
                                re.S))  # fmt: skip
    imported = set()
    for m in re.finditer(r"^\s*(?:import|from)\s+(.+?)$", code, re.M):
        for item in m.group(1).split(","):
            imported.add(item.split()[0].split(".")[0])
    imported -= {"xai_workers", "xai_audit"}
    assert {"pandas", "duckdb", "pyarrow"} <= imported  # the section is what we think it is
    missing = {i for i in imported if DIST.get(i, i).lower() not in installed}
    assert not missing, f"README command 1 does not install {sorted(missing)}"


def test_relative_links_resolve():
    broken = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text(encoding="utf-8")):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (doc.parent / target).exists():
                broken.append(f"{doc.relative_to(ROOT)} -> {target}")
        text = doc.read_text(encoding="utf-8").split("\n", 1)[-1]  # conventions.md's 1st line
        if "CONVENTIONS.md" in text:  # the team's copy outside the repository
            broken.append(f"{doc.relative_to(ROOT)} names CONVENTIONS.md, not docs/conventions.md")
    assert not broken, broken


def test_ci_runs_command_2_verbatim():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert _commands()[1] in ci.splitlines(), (_commands()[1], ci)


def test_commands_pick_the_torch_build_for_the_machine():
    """Neither command installs torch with a bare `pip install` (which on a CPU-only machine
    brings 3+ GB of CUDA libraries): both go through scripts/install.sh, which picks the index
    (tests/test_install_script.py)."""
    for cmd in _commands():
        assert cmd.startswith("scripts/install.sh "), cmd
        assert "pip install" not in cmd, cmd


def test_every_flag_of_every_command_says_what_it_does():
    """`xai-audit <command> --help` describes each flag (issue 22: `layers --help` listed bare
    flags)."""
    import argparse

    from xai_audit import cli

    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    bare = {
        name: [a.option_strings or [a.dest] for a in p._actions if not a.help]
        for name, p in sub.choices.items()
    }
    assert "layers" in bare and not any(bare.values()), bare
