"""The README and docs/: every relative link resolves, and every `singularity-ds` command shown in a fenced
shell block of the README names a sub-command and flags that exist (its --help lists them)."""
import re
import shlex
from pathlib import Path

import pytest

from singularity_ds.cli import main

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


def readme_commands():
    text = (ROOT / "README.md").read_text()
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line.startswith("singularity-ds "):
                out.append(shlex.split(line)[1:])
    return out


def test_readme_is_a_front_door():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250
    assert len(readme_commands()) >= 12


@pytest.mark.parametrize("argv", readme_commands(), ids=lambda a: " ".join(a[:3]))
def test_a_readme_command_parses(argv, capsys):
    """The sub-command (and its kind) exist and each --flag is one its --help lists."""
    with_kind = ("eval", "bench", "preprocess", "doctor", "corpus-stats", "train")
    form = argv[:2] if argv[0] in with_kind else argv[:1]
    try:
        rc = main([*form, "--help"])
    except SystemExit as e:
        rc = e.code
    helptext = capsys.readouterr().out
    assert rc == 0 and helptext.startswith(f"usage: singularity-ds {argv[0]}"), helptext[:200]
    for flag in (a.split("=")[0] for a in argv if a.startswith("--")):
        assert re.search(rf"(^|[\s\[(,]){re.escape(flag)}\b", helptext), (flag, argv)
