"""The README as an entry point and the documentation site's sources (mkdocs.yml, docs/, the studies).

`make docs` (run by CI) builds the site with `mkdocs build --strict`, which fails on a broken link
or anchor as the site places the files. These tests check what that build does not: the README's
size, that the Markdown's relative links also work where it is read in the repository, and that
every page of docs/ is in the site's navigation.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
README_LIMIT = 15_000  # characters (bytes, which is stricter)
LINK = re.compile(r"\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def _markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "experiments").glob("*/*.md"))]


def _relative_links(path: Path) -> list[str]:
    text = FENCE.sub("", path.read_text(encoding="utf-8"))  # code blocks hold no links
    return [t for t in LINK.findall(text) if "://" not in t and not t.startswith(("#", "mailto:"))]


def test_readme_is_an_entry_point():
    readme = (ROOT / "README.md").read_bytes()
    assert len(readme) <= README_LIMIT, f"README.md has {len(readme)} bytes; the manual belongs in docs/"
    text = readme.decode()
    for command in ("make run", "make test", "experiment=quick", "intraneuron ui"):
        assert command in text
    for analysis in ("two_fold", "neuron_stats", "universal", "confidence"):
        assert f"| `{analysis}`" in text, analysis  # a row of the analyses table
    assert "](docs/images/" in text  # one picture


@pytest.mark.parametrize("path", _markdown_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve_in_the_repository(path):
    links = _relative_links(path)
    missing = [t for t in links if not (path.parent / t.split("#")[0]).exists()]
    assert not missing, f"{path.relative_to(ROOT)} links to missing files: {missing}"


def test_readme_links_to_every_docs_page_and_the_nav_holds_them():
    pages = {p.name for p in (ROOT / "docs").glob("*.md")}
    linked = {Path(t.split("#")[0]).name for t in _relative_links(ROOT / "README.md") if t.startswith("docs/")}
    assert pages <= linked, f"docs pages the README does not link: {sorted(pages - linked)}"

    def nav_files(entries) -> set[str]:
        found: set[str] = set()
        for entry in entries:
            value = next(iter(entry.values())) if isinstance(entry, dict) else entry
            found |= nav_files(value) if isinstance(value, list) else {value}
        return found

    nav = nav_files(yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))["nav"])
    assert pages <= nav, f"docs pages missing from mkdocs.yml's nav: {sorted(pages - nav)}"
    assert "index.md" in nav  # the README, placed by the hook
    studies = {p.relative_to(ROOT).as_posix() for p in (ROOT / "experiments").glob("*/README.md")}
    assert studies <= nav, f"studies missing from the nav: {sorted(studies - nav)}"


def test_site_links_follow_the_files_as_the_site_places_them():
    pytest.importorskip("mkdocs", reason="mkdocs comes with make setup (requirements.lock)")
    import importlib.util

    spec = importlib.util.spec_from_file_location("mkdocs_hooks", ROOT / "scripts" / "mkdocs_hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    link = hooks.site_link
    assert link("index.md", "docs/method.md") == "method.md"  # the README is the home page
    assert link("index.md", "docs/images/card.png") == "images/card.png"
    assert link("index.md", "experiments/universal_seeds/README.md") == "experiments/universal_seeds/README.md"
    assert link("studies.md", "../experiments/smollm2_layers/README.md") == "experiments/smollm2_layers/README.md"
    assert link("results.md", "images/card.png") == "images/card.png"
    assert link("method.md", "analyses.md") == "analyses.md"
    assert link("experiments/smollm2_layers/README.md", "results.md") == "results.md"
    assert link("experiments/smollm2_layers/README.md", "../../docs/method.md") == "../../method.md"
    assert link("experiments/smollm2_layers/README.md", "../../README.md") == "../../index.md"
    assert link("method.md", "https://example.org/x.md") == "https://example.org/x.md"
    assert link("method.md", "../conf/config.yaml") == "../conf/config.yaml"  # not in the site: strict reports it
