"""Reading the report table back from its text (``str(report)``, ``moba-compile explain``) in tests."""

from __future__ import annotations

import re


def parse_report_table(text: str) -> tuple[list[list[str]], dict[str, str]]:
    """The table's rows (9 cells each: graph, layer, module, decision, chunk, topk, form, impl, reason) and the notes
    under it by number (``"[1]"``), their wrapped lines joined."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("graph  layer"))
    rows = []
    end = start + 2
    while end < len(lines) and re.match(r"\d+  ", lines[end]):
        rows.append(re.split(r"\s{2,}", lines[end].strip()))
        end += 1
    notes: dict[str, str] = {}
    if end < len(lines) and lines[end] == "notes:":
        number = ""
        for line in lines[end + 1 :]:
            found = re.match(r"(\[\d+\]) (.*)", line)
            if found:
                number, notes[found[1]] = found[1], found[2]
            elif line.startswith("    ") and number:
                notes[number] += " " + line.strip()
            else:
                break
    return rows, notes
