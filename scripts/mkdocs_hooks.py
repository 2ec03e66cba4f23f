"""MkDocs hooks (mkdocs.yml `hooks:`): the site is the repository's Markdown as it reads on disk.

The README is the site's home page and each study's folder (`experiments/<study>/`: its README,
result tables and figures) is a section of the site, so neither is copied into docs/. Every page
keeps the links it has in the repository, where they work as written; the site places the files
as follows, and each page's relative links are rewritten to match:

    README.md        -> index.md
    docs/<page>      -> <page>
    experiments/...  -> experiments/...
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent.parent
STUDIES = "experiments"
STUDY_FILES = {".md", ".png"}  # the pages and their figures; scripts stay in the repository
LINK = re.compile(r"(\]\()([^)\s#]+)")  # a Markdown link or image target, up to any #anchor


def on_files(files, config):
    files.append(File.generated(config, "index.md", abs_src_path=str(ROOT / "README.md")))
    for path in sorted((ROOT / STUDIES).rglob("*")):
        if path.is_file() and path.suffix in STUDY_FILES:
            files.append(File.generated(config, path.relative_to(ROOT).as_posix(), abs_src_path=str(path)))
    return files


def _repository_path(src_uri: str) -> str:
    """Where the site's page `src_uri` lives in the repository."""
    if src_uri == "index.md":
        return "README.md"
    return src_uri if src_uri.startswith(STUDIES + "/") else "docs/" + src_uri


def _site_path(repository_path: str) -> str | None:
    """Where a repository file lies in the site, or None for a file the site does not hold."""
    if repository_path == "README.md":
        return "index.md"
    if repository_path.startswith("docs/"):
        return repository_path[len("docs/"):]
    return repository_path if repository_path.startswith(STUDIES + "/") else None


def site_link(src_uri: str, target: str) -> str:
    """A page's relative link, written for the repository, as the site needs it."""
    if "://" in target or target.startswith(("/", "mailto:")):
        return target
    page_dir = posixpath.dirname(_repository_path(src_uri))
    site = _site_path(posixpath.normpath(posixpath.join(page_dir, target)))
    if site is None:  # left as written: mkdocs --strict reports it
        return target
    return posixpath.relpath(site, posixpath.dirname(src_uri) or ".")


def on_page_markdown(markdown, page, config, files):
    src_uri = page.file.src_uri
    return LINK.sub(lambda m: m.group(1) + site_link(src_uri, m.group(2)), markdown)
