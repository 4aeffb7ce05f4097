"""The README and docs/: every relative link resolves; the README stays a front door (its commands run as
pasted in tests/test_doc_commands.py)."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))


def test_every_relative_link_resolves():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+://|mailto:|#", target):
                continue
            if not (page.parent / target.split("#")[0]).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken


def test_readme_is_a_front_door():
    """Short, and its commands many (each runs as pasted: tests/test_doc_commands.py)."""
    from test_doc_commands import commands
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250
    assert len([c for _, c in commands(ROOT / "README.md") if c.startswith("singularity-ds ")]) >= 12
