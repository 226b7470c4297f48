"""The README's component tables, generated from the components' own declarations (``fedsim list
--markdown`` prints them; a test checks that the README holds exactly this text between its markers)."""

from __future__ import annotations

from fedsim.config import RENAMED
from fedsim.core import components

START, END = "<!-- components:start -->", "<!-- components:end -->"


def _cell(value: object) -> str:
    return str(value).replace("|", "\\|")


def component_tables(kinds: list[str] | None = None) -> str:
    """One markdown table per kind: name, options (type, default, bounds) and help; built-ins only."""
    lines: list[str] = []
    for kind in kinds or list(components.KINDS):
        k = components.kind_of(kind)
        lines += [f"**{k.name}** (`{k.key}:`; {k.help})", "", "| name | option | type | default | meaning |",
                  "|---|---|---|---|---|"]  # fmt: skip
        if k.none:
            lines.append(f"| `{k.none}` | | | | no {k.name} |")
        for component in components.components(kind):
            if component.origin != "built-in":
                continue
            rows = components.describe(component)
            lines.append(f"| `{component.name}` | | | | {_cell(component.summary)} |")
            for row in rows:
                default = "required" if row["required"] else f"`{row['default']!r}`"
                bounds = f" ({row['bounds']})" if row["bounds"] else ""
                lines.append(
                    f"| | `{row['name']}` | {_cell(row['type'])}{bounds} | {_cell(default)} | {_cell(row['help'])} |"
                )
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def renamed_table() -> str:
    """The old flat keys and where each option lives now."""
    lines = ["| fedsim 0.1 key | now |", "|---|---|"]
    lines += [f"| `{old}` | `{new}` |" for old, new in RENAMED.items()]
    return "\n".join(lines) + "\n"


def readme_block() -> str:
    """The generated block between the README's markers."""
    return f"{START}\n{component_tables()}\n{renamed_table()}{END}"
