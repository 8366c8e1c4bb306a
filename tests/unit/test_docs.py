"""The project stands alone: no file points outside the repository, and every Markdown link resolves."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

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


def markdown_files() -> list[Path]:
    """The README, the guides under docs/, benchmarks/RESULTS.md: every Markdown file in the top two levels."""
    return sorted(path for path in [*REPO.glob("*.md"), *REPO.glob("*/*.md")]
                  if path.relative_to(REPO).parts[0] not in SKIPPED_DIRS)


def prose_lines(path: Path) -> Iterator[str]:
    """The lines of a Markdown file outside fenced code blocks; inline code keeps its text but not its
    backticks (as in GitHub's anchors), and cannot form a link."""
    in_fence = False
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
        elif not in_fence:
            yield re.sub(r"`[^`]*`", lambda span: span.group(0).strip("`").replace("](", ""), line)


def anchors(path: Path) -> Iterator[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens, repeats numbered."""
    seen: dict[str, int] = {}
    for line in prose_lines(path):
        heading = re.match(r"#{1,6} +(.*)", line)
        if heading:
            slug = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
            seen[slug] = seen.get(slug, -1) + 1
            yield slug if seen[slug] == 0 else f"{slug}-{seen[slug]}"


def links(path: Path) -> list[str]:
    return [target for line in prose_lines(path) for target in re.findall(r"\]\(([^)\s]+)\)", line)
            if "://" not in target and not target.startswith("mailto:")]


def test_markdown_files_are_found():
    names = {str(path.relative_to(REPO)) for path in markdown_files()}
    assert {"README.md", "docs/design.md", "docs/training.md"} <= names


@pytest.mark.parametrize("path", markdown_files(), ids=lambda path: str(path.relative_to(REPO)))
def test_every_relative_link_and_anchor_resolves(path):
    broken = []
    for target in links(path):
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        if not (resolved.is_relative_to(REPO) and resolved.exists()):
            broken.append(f"{target}: no such file in the repository")
        elif anchor and resolved.suffix == ".md" and anchor not in set(anchors(resolved)):
            broken.append(f"{target}: no heading with that anchor in {resolved.relative_to(REPO)}")
    assert broken == []


def test_readme_is_a_front_door_that_links_every_guide():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    first_block = re.search(r"```bash\n(.*?)```", readme, re.S).group(1)
    assert [line.split()[:2] for line in first_block.splitlines()] == [["make", "demo"], ["make", "test"]]
    linked = {(REPO / target.partition("#")[0]).resolve() for target in links(REPO / "README.md")}
    guides = set((REPO / "docs").glob("*.md"))
    assert guides - linked == set()
