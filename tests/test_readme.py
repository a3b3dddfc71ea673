"""The README and docs/ stay true to the code: snippets parse (and the self-contained ones run), their imports and the
dotted names in the prose resolve, the commands exist, and every relative link and shipped path resolves."""

from __future__ import annotations

import ast
import importlib
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PAGES = {
    path.relative_to(ROOT).as_posix(): path.read_text()
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
}


def _blocks(language: str) -> list[tuple[str, int, str]]:
    """``(page, index, code)`` of every fenced block of ``language`` on every page."""
    return [
        (page, index, code)
        for page, text in PAGES.items()
        for index, code in enumerate(re.findall(rf"```{language}\n(.*?)```", text, re.S))
    ]


PYTHON_BLOCKS = _blocks("python")
BASH_BLOCKS = _blocks("bash")
# Blocks that need no model, data or trainer: marked `<!-- snippet: runs -->` and executed as written.
RUNNABLE = [
    (page, index, code)
    for page, text in PAGES.items()
    for index, code in enumerate(re.findall(r"<!-- snippet: runs -->\s*```python\n(.*?)```", text, re.S))
]


def _ids(blocks):
    return [f"{page}:{index}" for page, index, _ in blocks]


def test_docs_pages_exist_and_the_readme_stays_short():
    assert len(PAGES) >= 10, sorted(PAGES)
    assert len(README.splitlines()) <= 450, "the README is what a user reads first: reference material goes to docs/"


def test_readme_has_the_two_commands_and_ci_runs_the_test_one():
    assert "make demo" in README and "make test" in README
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^\s*make test\s*$", ci, re.M), ".ci/run must run exactly the README's test command"


@pytest.mark.parametrize(("page", "index", "code"), PYTHON_BLOCKS, ids=_ids(PYTHON_BLOCKS))
def test_python_snippet_parses(page, index, code):
    ast.parse(code, filename=f"{page} python block {index}")


@pytest.mark.parametrize(("page", "index", "code"), RUNNABLE, ids=_ids(RUNNABLE))
def test_self_contained_snippet_runs(page, index, code):
    exec(compile(code, f"{page} runnable block {index}", "exec"), {})


def test_enough_snippets_run():
    assert len(RUNNABLE) >= 5 and any(page == "README.md" for page, _, _ in RUNNABLE)


def test_snippet_imports_resolve():
    """Every `from hf_batchsched... import a, b` and `import hf_batchsched...` of every page names something that
    exists."""
    checked = 0
    for page, index, code in PYTHON_BLOCKS:
        for node in ast.walk(ast.parse(code)):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("hf_batchsched"):
                module = importlib.import_module(node.module)
                for alias in node.names:
                    assert hasattr(module, alias.name), f"{page} block {index} imports {alias.name} from {node.module}"
                    checked += 1
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("hf_batchsched"):
                        importlib.import_module(alias.name)
                        checked += 1
    assert checked >= 10


def _resolve_dotted(name: str) -> bool:
    """``hf_batchsched.a.b.C``: the longest importable module prefix, then attributes."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            target = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[cut:]:
            if not hasattr(target, attribute):
                return False
            target = getattr(target, attribute)
        return True
    return False


def test_dotted_names_in_the_prose_resolve():
    """`hf_batchsched.x.y` written in inline code (module paths, functions, state keys) exists."""
    names = {
        (page, name)
        for page, text in PAGES.items()
        for span in re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
        for name in re.findall(r"\bhf_batchsched(?:\.[A-Za-z_]\w*)+", span)
    }
    assert len(names) >= 10
    missing = sorted(f"{page}: {name}" for page, name in names if not _resolve_dotted(name))
    assert not missing, f"the docs name modules or attributes that do not exist: {missing}"


def test_every_cli_command_in_the_docs_exists():
    from hf_batchsched.cli import COMMANDS

    used = set()
    for text in PAGES.values():
        used |= set(re.findall(r"`hf-batchsched ([a-z][a-z-]+)", text))
    used |= set(
        re.findall(r"^\s*(?:time )?hf-batchsched ([a-z][a-z-]+)", "\n".join(c for _, _, c in BASH_BLOCKS), re.M)
    )
    assert {"demo", "finetune", "plot"} <= used, "the docs show hf-batchsched commands"
    unknown = {name for name in used if name not in COMMANDS}
    assert not unknown, f"the docs name commands that do not exist: {sorted(unknown)}"


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


def _links(text: str) -> list[str]:
    """Relative link targets (``[text](target)``, images included) outside code blocks; web links left out."""
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    return [target for target in re.findall(r"\]\(([^)\s]+)\)", prose) if "://" not in target]


@pytest.mark.parametrize("page", sorted(PAGES))
def test_relative_links_and_shipped_paths_exist(page):
    """Links resolve from the page's folder, anchors to a heading of the target page; `recipes/...`-style paths in
    inline code are repository paths."""
    here = (ROOT / page).parent
    problems = []
    for target in _links(PAGES[page]):
        path, _, anchor = target.partition("#")
        file = (here / path).resolve() if path else ROOT / page
        if not file.exists():
            problems.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in _github_anchors(file.read_text()):
            problems.append(f"{target}: no heading '#{anchor}' in {file.relative_to(ROOT)}")
    for path in re.findall(
        r"`((?:recipes|benchmarks|hf_batchsched|tests|docs)/[\w./-]+\.(?:py|yaml|json|png|md))`", PAGES[page]
    ):
        if not (ROOT / path).exists():
            problems.append(f"`{path}`: no such file")
    assert not problems, f"{page} points at things that do not exist: {problems}"


def test_the_readme_links_every_docs_page_and_the_pages_link_by_anchor():
    pages = {path for path in PAGES if path.startswith("docs/")}
    assert pages <= {target.partition("#")[0] for target in _links(README)}, "the README's table lists each page"
    assert sum("#" in target for text in PAGES.values() for target in _links(text)) >= 20, "the link checks check"


YAML_BLOCKS = _blocks("yaml")


@pytest.mark.parametrize(("page", "index", "code"), YAML_BLOCKS, ids=_ids(YAML_BLOCKS))
def test_yaml_snippet_builds(page, index, code):
    """A YAML block parses, and its `batch_schedule` / `lr_policy` build with today's config keys."""
    import yaml

    from hf_batchsched.schedules import batch_schedule_from_config, lr_policy_from_config

    config = yaml.safe_load(code)
    assert isinstance(config, dict), f"{page} yaml block {index}"
    assert "batch_schedule" in config or "lr_policy" in config, f"{page} yaml block {index} configures nothing"
    if "batch_schedule" in config:
        batch_schedule_from_config(config["batch_schedule"])
    if "lr_policy" in config:
        lr_policy_from_config(config["lr_policy"])


def _invocations() -> list[tuple[str, str, str]]:
    """``(page, command, arguments)`` of each `hf-batchsched COMMAND ...` or `recipes/finetune.py ...` (the
    `finetune` command) in a bash block or inline code, continuation lines joined, comments dropped."""
    found = []
    for page, text in PAGES.items():
        commands = [code.replace("\\\n", " ") for code in re.findall(r"```bash\n(.*?)```", text, re.S)]
        commands += re.findall(r"`([^`\n]*(?:recipes/finetune\.py|hf-batchsched [a-z])[^`\n]*)`", text)
        for block in commands:
            for line in block.splitlines():
                match = re.search(r"(?:recipes/finetune\.py|hf-batchsched ([a-z][a-z-]*))(.*)", line.split("#")[0])
                if match:
                    found.append((page, match.group(1) or "finetune", match.group(2)))
    return found


def test_command_options_in_the_docs_exist():
    """Every `--option` given to an `hf-batchsched` command (or the recipe script) is one its `--help` names: a
    renamed flag or config key shows here. `finetune --help` lists the config keys, which are its options."""
    import contextlib
    import io

    from hf_batchsched.cli import COMMANDS, main

    helps: dict[str, set[str]] = {}
    unknown = set()
    invocations = _invocations()
    for page, command, arguments in invocations:
        if command not in COMMANDS:
            continue  # test_every_cli_command_in_the_docs_exists reports it
        if command not in helps:
            out = io.StringIO()
            with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
                main([command, "--help"])
            helps[command] = set(re.findall(r"[a-z][a-z0-9_-]*", out.getvalue()))
        unknown |= {
            f"{page}: {command} --{key}"
            for key in re.findall(r"--([a-z][a-z0-9_-]*)", arguments)
            if key not in helps[command]
        }
    assert len(invocations) >= 20 and {"finetune", "plot", "critical-batch"} <= set(helps)
    assert not unknown, f"the docs pass options the commands do not have: {sorted(unknown)}"
