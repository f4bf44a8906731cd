"""The documents: links that resolve, a README for users, figures that say where they come from,
and an install section that works as written."""

from __future__ import annotations

import ast
import re
import shlex
import subprocess
import sys
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# Numbered sittings of work, and what a diary says instead of a date or a command.
DIARY = re.compile(
    r"\b(session|sessions|sitting|(first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth|eleventh)"
    r" (session|sitting)|not re-measured|previous (session|release|default))\b",
    re.IGNORECASE,
)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    return {_slug(line.lstrip("#")) for line in path.read_text().splitlines() if line.startswith("#")}


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.name)
def test_every_relative_link_resolves(document):
    for target in LINK.findall(document.read_text()):
        if re.match(r"[a-z]+://|mailto:", target):
            continue
        path, _, anchor = target.partition("#")
        resolved = (document.parent / path).resolve() if path else document
        assert resolved.exists(), f"{document.name}: {target} does not exist"
        if anchor:
            assert anchor in _anchors(resolved), f"{document.name}: no heading #{anchor} in {resolved.name}"


def test_the_readme_is_a_users_guide():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    for section in ("## Install", "## Quick start", "## Commands", "## Results", "## Python API", "## Licence"):
        assert section in text


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.name)
def test_documents_speak_of_the_project_not_of_who_worked_on_it_when(document):
    found = [m.group(0) for m in DIARY.finditer(document.read_text())]
    assert not found, f"{document.name}: {found}"


def test_source_comments_carry_no_diary_either():
    for path in (REPO / "src").rglob("*.py"):
        found = [m.group(0) for m in DIARY.finditer(path.read_text())]
        assert not found, f"{path}: {found}"


@pytest.mark.parametrize("document", sorted((REPO / "docs").glob("*.md")), ids=lambda p: p.name)
def test_every_page_with_figures_says_which_machine_and_when(document):
    text = document.read_text()
    tables_of_numbers = re.search(r"^\|.*\d\.\d{2}.*\|$", text, re.MULTILINE)
    if tables_of_numbers:
        assert re.search(r"20\d\d-\d\d-\d\d", text), f"{document.name}: figures without a date"
        assert re.search(r"AVX", text), f"{document.name}: figures without the machine's instruction set"
        assert re.search(r"(python (benchmarks|experiments)/|bloodcell [a-z-]+)", text), document.name


def _readme_block(start: str) -> list[str]:
    """The commands of the README's fenced block that contains `start`, comments stripped."""
    text = (REPO / "README.md").read_text()
    block = next(b for b in re.findall(r"```bash\n(.*?)```", text, re.DOTALL) if start in b)
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]


@pytest.mark.slow
def test_the_install_section_works_in_a_fresh_virtual_environment(tmp_path, pbc_sample):
    """Build the wheel and install it exactly as the README says, into an empty environment; the
    CPU build of torch comes from this machine's wheel (the package index is not reachable here)."""
    commands = _readme_block("pip wheel")
    env_dir = tmp_path / "env"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    subprocess.run([python, "-m", "pip", "install", "-q", "torch==2.13.0"], check=True, capture_output=True)
    for line in commands:
        argv = shlex.split(line)
        if argv[:2] == ["pip", "wheel"] or (argv[:2] == ["pip", "install"] and "dist/" in line and "[" not in line):
            argv = [str(python), "-m", *argv]
            env = {"PATH": f"{env_dir / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path)}
            cwd = REPO if "wheel" in argv else tmp_path
            result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, env=env)
            assert result.returncode == 0, (line, result.stderr[-2000:])
            if "wheel" in argv:
                (tmp_path / "dist").mkdir(exist_ok=True)
                for wheel in (REPO / "dist").glob("bloodcell-*.whl"):
                    wheel.rename(tmp_path / "dist" / wheel.name)
    bloodcell = env_dir / "bin" / "bloodcell"
    assert "bloodcell 0.2.0" in subprocess.run([bloodcell, "--version"], capture_output=True, text=True).stdout
    result = subprocess.run([bloodcell, "predict", str(pbc_sample[0]["path"])], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "1 of 1 images classified" in result.stdout and "packaged with bloodcell" in result.stderr
    assert sys.prefix not in result.stderr  # the environment's own copy ran, not this checkout's


@pytest.mark.parametrize("script", sorted((REPO / "experiments").glob("*.py")), ids=lambda p: p.name)
def test_every_experiment_says_where_its_answer_is_documented(script):
    docstring = ast.get_docstring(ast.parse(script.read_text())) or ""
    assert f"python experiments/{script.name}" in docstring, f"{script.name}: no command line in its docstring"
    found = re.search(r"documented in (docs/[\w-]+\.md)#([\w-]+)", docstring)
    assert found, f"{script.name}: does not say where its answer is documented"
    assert found.group(2) in _anchors(REPO / found.group(1)), f"{script.name}: no #{found.group(2)} in {found.group(1)}"
