"""The README stays true to the code: its snippets parse, its commands exist, its links and paths resolve."""

from __future__ import annotations

import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()

PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)
BASH_BLOCKS = re.findall(r"```bash\n(.*?)```", README, re.S)


def test_readme_has_the_two_commands_and_ci_runs_the_test_one():
    assert "make demo" in README and "make test" in README
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^\s*make test\s*$", ci, re.M), ".ci/run must run exactly the README's test command"


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_python_snippet_parses(index):
    ast.parse(PYTHON_BLOCKS[index])


def test_snippet_imports_resolve():
    """Every `from hf_batchsched... import a, b` in the README names something that exists."""
    import importlib

    checked = 0
    for block in PYTHON_BLOCKS:
        for node in ast.walk(ast.parse(block)):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("hf_batchsched"):
                module = importlib.import_module(node.module)
                for alias in node.names:
                    assert hasattr(module, alias.name), f"README imports {alias.name} from {node.module}"
                    checked += 1
    assert checked >= 10


def test_every_cli_command_in_the_readme_exists():
    from hf_batchsched.cli import COMMANDS

    in_code = re.findall(r"`hf-batchsched ([a-z][a-z-]+)", README)
    in_blocks = re.findall(r"^\s*(?:time )?hf-batchsched ([a-z][a-z-]+)", "\n".join(BASH_BLOCKS), re.M)
    used = set(in_code + in_blocks)
    assert used, "the README shows hf-batchsched commands"
    unknown = {name for name in used if name not in COMMANDS}
    assert not unknown, f"README names commands that do not exist: {sorted(unknown)}"


def test_relative_links_and_shipped_paths_exist():
    links = [t for t in re.findall(r"\]\(([^)#]+)\)", README) if "://" not in t]
    paths = re.findall(r"`((?:recipes|benchmarks|hf_batchsched|tests)/[\w./-]+\.(?:py|yaml|json|png))`", README)
    missing = sorted({p for p in links + paths if not (ROOT / p).exists()})
    assert len(links) + len(paths) >= 10
    assert not missing, f"README points at files that do not exist: {missing}"


def _github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives the headings: lower case, punctuation dropped, spaces to '-', repeats numbered."""
    anchors, seen = set(), {}
    text = re.sub(r"```.*?```", "", markdown, flags=re.S)
    for heading in re.findall(r"^#{1,6} (.+)$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def test_internal_anchor_links_resolve():
    targets = re.findall(r"\]\(#([^)]+)\)", README)
    assert len(targets) >= 10
    missing = sorted(set(targets) - _github_anchors(README))
    assert not missing, f"README links to headings that do not exist: {missing}"
