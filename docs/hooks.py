"""MkDocs hooks: the pages that are generated, never written by hand. The config reference comes
from the typed config's fields (imgvae.config.reference), the command-line reference from the parser
(imgvae.commands.parser), the results page and the changelog from bench/RESULTS.md and CHANGELOG.md.
A page asks for one with a marker line: <!-- generated: config -->, cli, results, changelog."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def config_reference() -> str:
    from imgvae.config.reference import config_reference as rows_of

    out = []
    for title, rows in rows_of():
        out += [f"### {title}", "", "| key | type | default | bounds | what it does |", "|---|---|---|---|---|"]
        for r in rows:
            cells = [f"`{r['key']}`", r["type"], f"`{r['default']!r}`", r["bounds"] or "", r["help"]]
            out.append("| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
        out.append("")
    return "\n".join(out)


def cli_reference() -> str:
    from imgvae.commands.parser import build_parser

    parser = build_parser()
    verbs = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    out = ["```text", parser.format_help().rstrip(), "```", ""]
    for name, sub in verbs.choices.items():
        out += [f"### imgvae {name}", "", "```text", sub.format_help().rstrip(), "```", ""]
    return "\n".join(out)


def included(path: str, drop_title: bool = True) -> str:
    text = (ROOT / path).read_text()
    if drop_title:
        text = re.sub(r"\A# .*\n", "", text)
    return text


GENERATED = {"config": config_reference, "cli": cli_reference,
             "results": lambda: included("bench/RESULTS.md").replace("](../docs/", "]("), "changelog": lambda: included("CHANGELOG.md").replace("](bench/RESULTS.md)", "](results.md)")}


def on_page_markdown(markdown: str, page, config, files) -> str:
    def replace(match: re.Match) -> str:
        return GENERATED[match.group(1)]()

    return re.sub(r"^<!-- generated: (\w+) -->$", replace, markdown, flags=re.M)
