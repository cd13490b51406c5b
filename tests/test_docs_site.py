"""The manual builds: `mkdocs build --strict` (a broken link or anchor, a page missing from the nav, a missing image
or included file fails it) writes the home page and one page per nav entry, with the API reference filled in."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from readme_runner import REPO, nav_pages


def _built_page(site: Path, page: str) -> Path:
    """Where mkdocs (use_directory_urls) writes docs/NAME.md: NAME/index.html, and index.md at the top."""
    stem = Path(page).relative_to("docs").with_suffix("")
    return site / "index.html" if stem.name == "index" else site / stem / "index.html"


def test_docs_site_builds_strictly(tmp_path):
    pytest.importorskip("mkdocs", reason="the docs tools are the `docs` extra (in requirements/lock-py3.11.txt)")
    site = tmp_path / "site"
    mkdocs = Path(sys.executable).with_name("mkdocs")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # Material's notice about its successor, not a build problem
    proc = subprocess.run([str(mkdocs), "build", "--strict", "--config-file", str(REPO / "mkdocs.yml"), "-d", str(site)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    assert (site / "index.html").is_file()
    pages = nav_pages()
    assert len(pages) >= 16 and len(set(pages)) == len(pages), pages
    missing = [p for p in pages if not _built_page(site, p).is_file()]
    assert not missing, f"no HTML written for {missing}"
    api = _built_page(site, "docs/api.md").read_text()
    for name in ("facereward.measures.register_measure", "facereward.models.restorer.Restorer",
                 "facereward.models.ddim", "facereward.train.lrpo", "facereward.data.toyfaces"):
        assert f'id="{name}' in api, f"the API reference lacks {name}"
    results = _built_page(site, "docs/results.md").read_text()
    assert "--8&lt;--" not in results and "<td>ReFL</td>" in results, "the README's demo table was not included"
    assert "fonts.googleapis.com" not in (site / "index.html").read_text()  # theme.font: false: nothing fetched
