"""The docs a user reads stay true: every relative link and image in the README and docs/
resolves, every figure in docs/ is shown somewhere, and every `swr ...` command in the
code blocks of the README and docs/ parses with today's CLI."""

import re
import shlex
from pathlib import Path

from swr.app.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def test_every_relative_link_and_image_resolves():
    broken = []
    for page in PAGES:
        for link in re.findall(r"\]\(([^)#\s]+)", page.read_text(encoding="utf-8")):
            if not link.startswith(("http://", "https://")) and not (page.parent / link).exists():
                broken.append(f"{page.relative_to(ROOT)}: {link}")
    assert broken == []


def test_every_figure_in_docs_is_shown():
    text = "".join(p.read_text(encoding="utf-8") for p in PAGES)
    assert [p.name for p in (ROOT / "docs").rglob("*.png") if p.name not in text] == []


def test_the_commands_in_readme_and_docs_parse():
    lines = [ln.strip() for page in PAGES for ln in page.read_text(encoding="utf-8").splitlines()
             if ln.startswith("    ")]
    commands, current = [], ""
    for ln in lines:  # join continuation lines
        current += " " + ln.rstrip("\\").strip()
        if not ln.endswith("\\"):
            commands.append(current.strip())
            current = ""
    swr = [c.split("&& ")[-1].split("#")[0] for c in commands if re.search(r"(^|&& )swr ", c)]
    assert len(swr) >= 20
    parser = build_parser()
    for command in swr:
        parser.parse_args(shlex.split(command)[1:])


def test_the_readme_python_snippet_runs(tmp_path, monkeypatch):
    """The README's "Python first" block runs as written (in a scratch folder: it writes
    base.safetensors and task.safetensors), its comments' figures included."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text[text.index("## Python first"):].split("\n\n")[1]
    code = "\n".join(line[4:] for line in block.splitlines())
    assert code.startswith("import torch") and "apply_task_delta" in code
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 (our own README)
    assert scope["budget"] == 558_825
