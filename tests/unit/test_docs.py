"""The project stands alone: no file points outside the repository, and the README's links resolve."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# Generated or installed trees that are not the project's own files
SKIPPED_DIRS = {".git", ".venv", "build", "__pycache__", ".pytest_cache", ".hypothesis", "demo_output"}
TEXT_SUFFIXES = {".py", ".md", ".toml", ".txt", ".cfg", ".ini", ".yaml", ".yml", ".json", ".sh", ""}


def project_files():
    for path in REPO.rglob("*"):
        parts = set(path.relative_to(REPO).parts)
        if path.is_file() and not parts & SKIPPED_DIRS and not any(p.endswith(".egg-info") for p in parts) \
                and path.suffix in TEXT_SUFFIXES and "results" not in parts:
            yield path


def test_no_project_file_references_the_shared_folder_outside_the_repository():
    needles = ("../" + "shared", "/work/" + "shared")  # split so this file does not match itself
    offenders = [f"{path.relative_to(REPO)}: {needle}" for path in project_files()
                 for needle in needles if needle in path.read_text(errors="replace")]
    assert offenders == []


def test_readme_links_resolve_inside_the_repository():
    readme = (REPO / "README.md").read_text()
    targets = [t for t in re.findall(r"\]\(([^)#\s]+)", readme) if "://" not in t]
    assert "docs/design.md" in targets
    for target in targets:
        resolved = (REPO / target).resolve()
        assert resolved.is_relative_to(REPO) and resolved.exists(), target
