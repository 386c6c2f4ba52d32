"""The docs: the README's layout table describes the tree as it is, and every relative link resolves.

(The command lines and `key=value` overrides of every page are checked in test_config.py.)
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _layout_rows():
    """The body rows of the table under the README's `## Layout` heading."""
    text = (ROOT / "README.md").read_text()
    section = re.search(r"^## Layout\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert section, "README.md has no '## Layout' section"
    rows = [line for line in section[1].splitlines() if line.startswith("|")]
    assert len(rows) > 2, "the README's layout section holds no table"
    return rows[2:]  # past the header and the |---| line


LAYOUT = _layout_rows()
VITCORE_PATHS = sorted({path for row in LAYOUT for path in re.findall(r"`(vitcore/[^`\s]*)`", row)})


def test_every_layout_row_names_a_backticked_path():
    for row in LAYOUT:
        first = row.split("|")[1].strip()
        assert re.fullmatch(r"`[\w.]+(/[\w.]+)*/?`", first), f"layout row without a `path` first: {row[:80]}"
        if not first.startswith("`vitcore/"):  # vitcore's paths: one test each, below
            assert (ROOT / first.strip("`")).exists(), f"the layout table names {first}, which does not exist"


def test_the_layout_table_names_vitcore_paths():
    assert "vitcore/" in VITCORE_PATHS and len(VITCORE_PATHS) >= 10, VITCORE_PATHS


@pytest.mark.parametrize("path", VITCORE_PATHS)
def test_every_vitcore_path_in_the_layout_table_exists(path):
    assert (ROOT / path).exists(), f"README layout table: {path} does not exist"
    assert (ROOT / path).is_dir() == path.endswith("/"), f"README layout table: write folders with a trailing /: {path}"


MODULES = sorted(
    [p.relative_to(ROOT).as_posix() for p in (ROOT / "vitcore").rglob("*.py")
     if p.name not in ("__init__.py", "__main__.py")]
    + [p.parent.relative_to(ROOT).as_posix() + "/" for p in (ROOT / "vitcore").rglob("__init__.py")])


@pytest.mark.parametrize("module", MODULES)
def test_every_vitcore_module_is_in_the_layout_table(module):
    assert module in VITCORE_PATHS, f"{module} is not in the README's layout table"


def _anchors(page):
    """GitHub's heading anchors of a markdown page (lowercase, punctuation dropped, spaces to -)."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
            for heading in re.findall(r"^#+ (.*)$", text, re.M)}


def _links():
    found = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if not re.match(r"[a-z][a-z0-9+.\-]*:", target):  # http:, https:, mailto: ... are not checked here
                found.append((page.relative_to(ROOT).as_posix(), target))
    return list(dict.fromkeys(found))  # each (page, target) once


LINKS = _links()


def test_the_docs_link_their_pages_and_figures():
    targets = {(page, target.split("#")[0]) for page, target in LINKS}
    for page in PAGES[1:]:  # every docs page is reachable from the README
        assert ("README.md", page.relative_to(ROOT).as_posix()) in targets, f"README.md does not link {page.name}"
    assert any(target.startswith("figures/") for page, target in targets if page.startswith("docs/"))


@pytest.mark.parametrize("page,target", LINKS, ids=[f"{p} -> {t}" for p, t in LINKS])
def test_every_relative_link_resolves(page, target):
    path, _, anchor = target.partition("#")
    file = (ROOT / page).parent / path if path else ROOT / page
    assert file.exists(), f"{page}: link to {target}: no such file {file.relative_to(ROOT)}"
    if anchor and file.suffix == ".md":
        assert anchor in _anchors(file), f"{page}: link to {target}: no heading with that anchor"


OLD_NAMES = ["vitcore/engine.py", "vitcore/monitor.py", "vitcore/evaluation.py", "vitcore.plots", "`Monitor`",
             "vitcore/report.py", "vitcore.engine", "vitcore.evaluation", "vitcore.monitor"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_page_names_a_module_path_that_moved(page):
    text = page.read_text()
    assert not [name for name in OLD_NAMES if name in text]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_python_m_module_a_page_names_exists(page):
    for module in re.findall(r"python -m ([\w.]+)", page.read_text()):
        base = ROOT / module.replace(".", "/")
        assert base.with_suffix(".py").exists() or (base / "__main__.py").exists(), f"{page.name}: python -m {module}"


def test_the_readme_stays_a_first_page():
    """What a newcomer needs first fits in ~200 lines; the rest lives in docs/."""
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200
