"""The documentation a clone can follow: every `docs/<page>.md §N` the code cites exists with that section, no
citation of the specification files that live outside the repository remains, every relative link between
the pages resolves, and every built-in method has its page."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SOURCES = sorted({*ROOT.glob("fairbench/**/*.py"), *ROOT.glob("fairbench/**/*.csv"), *ROOT.glob("methods/*.py"),
                  *ROOT.glob("tests/**/*.py"), *ROOT.glob("benchmarks/**/*.py"), *DOCS.glob("**/*.md"),
                  ROOT / "README.md", ROOT / "CONTRIBUTING.md"} - {Path(__file__).resolve()})

CITATION = re.compile(r"docs/([\w./-]+?\.md)((?:(?:\s+|\s*,\s*|\s+and\s+)§\d+(?:\.\d+)*)*)")
SECTION = re.compile(r"§(\d+(?:\.\d+)*)")
HEADING = re.compile(r"^#{2,6}\s+(\d+(?:\.\d+)*)\.?\s", re.MULTILINE)
MARKDOWN_FILE = re.compile(r"(?<![\w/.-])((?:[\w.-]+/)*[\w-]+\.md)\b")
SPEC_NAMES = {"evaluation.md", "metrics.md", "statistics.md", "trades.md", "dafa.md", "trix.md", "frl.md", "bat.md",
              "wat.md", "cfa.md", "fairtat.md"}
"""The documentation pages; the specification files the code was first written from had the same names."""


def _sections(page: Path) -> set[str]:
    return set(HEADING.findall(page.read_text(encoding="utf-8")))


def _citations() -> list[tuple[Path, str, str | None]]:
    """(file, cited page, cited section or None) for every citation in the sources."""
    found = []
    for path in SOURCES:
        for match in CITATION.finditer(path.read_text(encoding="utf-8")):
            sections = SECTION.findall(match.group(2))
            found += [(path, match.group(1), s) for s in sections] or [(path, match.group(1), None)]
    return found


def test_the_code_cites_the_documentation():
    cited = {page for _, page, _ in _citations()}
    assert {"evaluation.md", "metrics.md", "methods/trades.md", "methods/cfa.md"} <= cited


@pytest.mark.parametrize("path, page, section", _citations(),
                         ids=lambda v: v.relative_to(ROOT).as_posix() if isinstance(v, Path) else str(v))
def test_every_cited_page_and_section_exists(path, page, section):
    target = DOCS / page
    assert target.is_file(), f"{path.relative_to(ROOT)} cites docs/{page}, which does not exist"
    if section is not None:
        assert section in _sections(target), (
            f"{path.relative_to(ROOT)} cites docs/{page} §{section}; its sections are {sorted(_sections(target))}")


def test_no_citation_of_the_specification_files_outside_the_repository():
    stale = []
    for path in SOURCES:
        if DOCS in path.parents:
            continue
        text = path.read_text(encoding="utf-8")
        for line_no, line in enumerate(text.splitlines(), start=1):
            names = [m for m in MARKDOWN_FILE.findall(line) if not m.startswith("docs/")]
            if "specs/" in line or any(Path(m).name in SPEC_NAMES for m in names):
                stale.append(f"{path.relative_to(ROOT)}:{line_no}: {line.strip()}")
    assert not stale, "citations of files a clone does not have (point them to docs/):\n" + "\n".join(stale)


def test_relative_links_between_pages_resolve():
    broken = []
    for page in DOCS.glob("**/*.md"):
        for target in re.findall(r"\]\(([^)#\s]+(?:\.md|/))\)", page.read_text(encoding="utf-8")):
            if "://" not in target and not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, broken


CODE_PATH = re.compile(r"(?<![\w/.-])((?:fairbench|methods|tests|benchmarks)/[\w/.-]+\.(?:py|toml|csv))")
CODE_NAME = re.compile(r"`(?:fairbench\.)?((?:[a-z_][a-z0-9_]*\.)+)([A-Za-z_]\w*)(?=[`(\[])")


def test_files_and_python_names_the_pages_mention_exist():
    """A page that names `fairbench/x.py` or `module.function` still matches the code after a rename."""
    import importlib

    missing = []
    for page in DOCS.glob("**/*.md"):
        text = page.read_text(encoding="utf-8")
        missing += [f"{page.name}: {p}" for p in CODE_PATH.findall(text) if not (ROOT / p).exists()]
        for module_path, name in CODE_NAME.findall(text):
            module_path = module_path.rstrip(".")
            first = module_path.split(".")[0]
            if name in ("py", "json", "md", "csv", "toml", "png", "sh") or not (
                    (ROOT / "fairbench" / f"{first}.py").is_file() or (ROOT / "fairbench" / first).is_dir()):
                continue  # a file name, or not a fairbench module (torch.autograd.grad, sys.settrace)
            try:
                module = importlib.import_module(f"fairbench.{module_path}")
            except ModuleNotFoundError:
                missing.append(f"{page.name}: fairbench.{module_path}")
                continue
            if not hasattr(module, name):
                missing.append(f"{page.name}: fairbench.{module_path}.{name}")
    assert not missing, missing


def test_every_builtin_method_has_a_page_in_the_index():
    from fairbench.registry import list_methods, method_source

    index = (DOCS / "README.md").read_text(encoding="utf-8")
    missing = [m for m in list_methods() if method_source(m).package == "fairbench" and f"`{m}`" not in index]
    assert not missing, f"methods without a documentation page listed in docs/README.md: {missing}"
    for page in re.findall(r"\]\((methods/[\w-]+\.md)\)", index):
        assert {"1", "2", "3", "4"} <= _sections(DOCS / page), f"docs/{page} lacks the sections every method page has"
