"""Docs that cannot rot: every code block of README.md and docs/ is run or checked here. A block is
marked by an HTML comment on the line before its fence: `<!-- not run: REASON -->` (a reason is
required) or `<!-- slow -->` (run only under -m slow, with small overrides that keep it to seconds).
Unmarked python blocks run in the default suite; unmarked bash blocks have each `imgvae` command
parsed by the real parser and each KEY=VALUE checked against the config's keys (what rots first:
flags, verbs, keys, presets); slow bash blocks run, one command after another, in a scratch folder.
Blocks in another language (text, yaml, a folder listing) are not code."""

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from imgvae.commands.parser import parse_args
from imgvae.config import PRESET_DIR, load_config
from imgvae.config.reference import field_of

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
# Appended to each command of a slow block: the same command in seconds, not minutes.
FAST = {"train": ["train.epochs=1", "data.views_per_image=2", "data.image_size=32", "train.time_limit=0.3"],
        "train-prior": ["prior.epochs=1", "prior.width=16", "prior.depth=1", "prior.time_limit=0.3"],
        "evaluate": ["eval.iw_samples=1", "eval.generation_images=8"]}


@dataclass
class Block:
    page: Path
    line: int
    language: str
    mark: str  # "", "slow" or "not run: REASON"
    code: str

    @property
    def name(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks() -> list[Block]:
    found = []
    for page in PAGES:
        lines = page.read_text().splitlines()
        i = 0
        while i < len(lines):
            match = re.match(r"^```(\w*)", lines[i])
            if match:
                end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
                mark = re.match(r"^<!-- (slow|not run:.*?) -->$", lines[i - 1]) if i else None
                found.append(Block(page, i + 1, match.group(1), mark.group(1) if mark else "",
                                   "\n".join(lines[i + 1:end])))
                i = end
            i += 1
    return found


BLOCKS = blocks()
PYTHON = [b for b in BLOCKS if b.language == "python"]
BASH = [b for b in BLOCKS if b.language == "bash"]


def commands(code: str) -> list[str]:
    """The block's command lines, continuations joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", code)
    return [re.sub(r"\s+#.*$", "", line).strip() for line in joined.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def test_every_mark_is_known_and_says_why_a_block_is_not_run():
    marks = [b for b in BLOCKS if b.mark.startswith("not run")]
    assert all(len(b.mark.removeprefix("not run:").strip()) > 10 for b in marks), [b.name for b in marks]
    assert len(PYTHON) >= 5 and len(BASH) >= 20  # the collection finds the blocks


@pytest.mark.parametrize("block", [b for b in BASH if not b.mark.startswith("not run")], ids=lambda b: b.name)
def test_every_imgvae_command_parses_and_names_real_keys(block):
    for line in commands(block.code):
        argv = shlex.split(line.replace("~", "/home/user"))
        if argv[0] != "imgvae":
            continue
        try:
            args = parse_args(argv[1:])
        except SystemExit as e:
            pytest.fail(f"{block.name}: `{line}` does not parse (exit {e.code})")
        for item in args.overrides or []:
            key = item.split("=", 1)[0]
            try:
                field_of(key)
            except KeyError:
                pytest.fail(f"{block.name}: `{line}`: {key} is not a config key")
        if getattr(args, "config", None) and not Path(args.config).suffix:
            assert (PRESET_DIR / f"{args.config}.yaml").is_file(), f"{block.name}: no preset {args.config!r}"
        if args.command == "train" and not args.resume:
            load_config(args.config, [o for o in args.overrides or [] if not o.startswith("data.")])


@pytest.mark.parametrize("block", [b for b in PYTHON if b.mark == ""], ids=lambda b: b.name)
def test_python_blocks_run(block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(block.code, block.name, "exec"), {"__name__": "__docs__"})


@pytest.mark.slow
@pytest.mark.parametrize("block", [b for b in PYTHON + BASH if b.mark == "slow"], ids=lambda b: b.name)
def test_slow_blocks_run(block, tmp_path_factory, monkeypatch):
    """Slow blocks of one page share a scratch folder, in page order: a tutorial's later steps use
    what its earlier ones made."""
    folder = tmp_path_factory.getbasetemp() / re.sub(r"\W", "_", str(block.page.relative_to(ROOT)))
    folder.mkdir(exist_ok=True)
    (folder / "docs").mkdir(exist_ok=True)
    for png in (ROOT / "docs").glob("*.png"):
        if not (folder / "docs" / png.name).exists():
            (folder / "docs" / png.name).symlink_to(png)
    monkeypatch.chdir(folder)
    if block.language == "python":
        exec(compile(block.code.replace('"train.epochs=1"', '"train.epochs=1", "data.image_size=32"'), block.name,
                     "exec"), {"__name__": "__docs__"})
        return
    for line in commands(block.code):
        argv = shlex.split(line)
        if argv[0] != "imgvae":
            continue
        argv = [sys.executable, "-m", "imgvae", *argv[1:], *FAST.get(argv[1], [])]
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        result = subprocess.run(argv, capture_output=True, text=True, env=env)
        assert result.returncode == 0, f"{block.name}: `{line}`\n{result.stderr[-2000:]}"


def slug(heading: str) -> str:
    """A heading's anchor as GitHub and MkDocs make it."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("page", ["README.md", "CHANGELOG.md"])
def test_the_links_of_pages_outside_the_site_reach_files_and_headings(page):
    """MkDocs checks the site's links; these two pages live at the repository's root."""
    for target in re.findall(r"\]\(([^)\s]+)\)", (ROOT / page).read_text()):
        if target.startswith(("http://", "https://")):
            continue
        path, _, anchor = target.partition("#")
        assert (ROOT / path).exists(), f"{page}: {target} does not exist"
        if anchor:
            headings = re.findall(r"^#+ (.*)$", (ROOT / path).read_text(), flags=re.M)
            assert anchor in {slug(h) for h in headings}, f"{page}: {target}: no such heading"


def test_the_changelog_leads_with_the_version_imgvae_reports():
    from imgvae import __version__

    first = re.search(r"^## (\d+\.\d+\.\d+) - \d{4}-\d{2}-\d{2}$", (ROOT / "CHANGELOG.md").read_text(), flags=re.M)
    assert first and first.group(1) == __version__
