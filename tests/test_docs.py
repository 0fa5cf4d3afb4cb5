"""The README's settings table is generated from accessd/settings/ and must stay in step with it."""

from __future__ import annotations

import re
from pathlib import Path

from accessd.settings import describe

README = Path(__file__).parents[1] / "README.md"


def settings_table() -> str:
    rows = ["| env | file key | meaning | default |", "|---|---|---|---|"]
    for info in describe():
        default = info.default
        if isinstance(default, tuple):
            default = ",".join(map(str, default)) or "(empty)"
        rows.append(
            f"| `{info.env}` | `{info.key}` | {info.doc} | `{'unset' if default is None else default}` |"
        )
    return "\n".join(rows)


def test_readme_lists_every_setting() -> None:
    text = README.read_text()
    match = re.search(r"<!-- settings-table.*?-->\n(.*?)\n<!-- /settings-table -->", text, re.S)
    assert match, "README.md lost its settings-table markers"
    assert match.group(1) == settings_table(), (
        "README settings table is stale; regenerate it with: python -m tests.test_docs"
    )


if __name__ == "__main__":
    text = README.read_text()
    text = re.sub(
        r"(<!-- settings-table.*?-->\n).*?(\n<!-- /settings-table -->)",
        lambda m: m.group(1) + settings_table() + m.group(2),
        text,
        flags=re.S,
    )
    README.write_text(text)
