#!/usr/bin/env python
"""Regenerate docs/configuration.md's tables from the recipes' config classes.

    python scripts/update_docs.py          # rewrite docs/configuration.md in place
    python scripts/update_docs.py --check  # exit 1 when docs/configuration.md is out of date (used by the tests)

Sections between ``<!-- config:RECIPE -->`` and ``<!-- /config:RECIPE -->`` are replaced.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rlnf.launcher import load_recipe  # noqa: E402
from rlnf.config import iter_keys  # noqa: E402

RECIPES = ("rl_finetune", "train_reward_model", "train_ctc")
PAGE = ROOT / "docs" / "configuration.md"


def table(recipe: str) -> str:
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for key, default, help_text in iter_keys(load_recipe(recipe).CONFIG_CLASS):
        shown = "**required**" if default == "(required)" else f"`{default!r}`".replace("|", "\\|")
        rows.append(f"| `{key}` | {shown} | {help_text.replace('|', '/')} |")
    return "\n".join(rows)


def render(text: str) -> str:
    for recipe in RECIPES:
        pattern = re.compile(rf"(<!-- config:{recipe} -->\n)(?:.*?\n)?(<!-- /config:{recipe} -->)", re.S)
        if not pattern.search(text):
            sys.exit(f"update_docs: {PAGE}: no <!-- config:{recipe} --> ... <!-- /config:{recipe} --> markers")
        text = pattern.sub(lambda m: m.group(1) + table(recipe) + "\n" + m.group(2), text)
    return text


if __name__ == "__main__":
    current = PAGE.read_text(encoding="utf-8")
    updated = render(current)
    if "--check" in sys.argv:
        sys.exit(0 if updated == current else 1)
    PAGE.write_text(updated, encoding="utf-8")
