#!/usr/bin/env python
"""Print the reliability table of docs/reliability.md from the fault-injection suite's results.

    python -m pytest -q tests/faults          # injects the faults, writes runs/faults/results.jsonl
    python launch/reliability_table.py        # that file as a Markdown table, with totals

Each line of the results file is one JSON object written by a test of tests/faults (see
tests/faults/conftest.py): {"fault", "target", "injections", "outcome", "detail", "test"}, the outcome
one of "identical" (survived, results identical to an uninterrupted run), "named error" (stopped with
an error naming what failed, nothing partial left) or "data lost". Rows of the same fault, target and
outcome are summed. Exit status: 0, or 1 when any row says "data lost" (or a test failed before it could
record an outcome), 2 when the file is missing or unreadable; the reason is printed on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import OrderedDict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = ROOT / "runs" / "faults" / "results.jsonl"
WORDS = {
    "identical": "survived, results identical",
    "named error": "stopped with a named error",
    "data lost": "**data lost**",
    "failed": "**test failed**",
}


def read_rows(path: Path) -> list[dict]:
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not an object")
            row = {
                "fault": str(row["fault"]),
                "target": str(row["target"]),
                "injections": int(row["injections"]),
                "outcome": str(row["outcome"]),
                "detail": str(row.get("detail", "")),
            }
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{path}:{number}: not a result row ({err})") from None
        rows.append(row)
    return rows


def table(rows: list[dict], details: bool = False) -> str:
    groups: OrderedDict[tuple[str, str, str], dict] = OrderedDict()
    for row in rows:
        key = (row["fault"], row["target"], row["outcome"])
        group = groups.setdefault(key, {"injections": 0, "details": []})
        group["injections"] += row["injections"]
        if row["detail"]:
            group["details"].append(row["detail"])
    header = ["fault", "injected", "times", "outcome"] + (["detail"] if details else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    for (fault, target, outcome), group in groups.items():
        cells = [fault, target, str(group["injections"]), WORDS.get(outcome, f"**{outcome}**")]
        if details:
            cells.append("; ".join(group["details"]))
        lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    by_outcome: dict[str, int] = {}
    for row in rows:
        by_outcome[row["outcome"]] = by_outcome.get(row["outcome"], 0) + row["injections"]
    total = sum(by_outcome.values())
    summary = (
        f"{by_outcome.get('identical', 0)} survived with identical results, "
        f"{by_outcome.get('named error', 0)} stopped with a named error, {by_outcome.get('data lost', 0)} data lost"
    )
    others = {o: n for o, n in by_outcome.items() if o not in ("identical", "named error", "data lost")}
    if others:
        summary += ", " + ", ".join(f"{n} {o}" for o, n in others.items())
    lines.append("")
    lines.append(f"Total: {total} faults injected in {len(groups)} rows: {summary}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="The results file is written by `python -m pytest -q tests/faults`; $GOLF_FAULT_RESULTS moves it.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "results",
        nargs="?",
        default=None,
        help=f"the suite's results file (default: $GOLF_FAULT_RESULTS or {DEFAULT.relative_to(ROOT)})",
    )
    parser.add_argument("--details", action="store_true", help="add a column with what each test saw")
    args = parser.parse_args(argv)
    import os

    path = Path(args.results or os.environ.get("GOLF_FAULT_RESULTS") or DEFAULT)
    if not path.is_file():
        print(f"error: {path} does not exist: run `python -m pytest -q tests/faults` first", file=sys.stderr)
        return 2
    try:
        rows = read_rows(path)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not rows:
        print(f"error: {path} holds no results: run `python -m pytest -q tests/faults` first", file=sys.stderr)
        return 2
    print(table(rows, args.details))
    bad = [r for r in rows if r["outcome"] not in ("identical", "named error")]
    if bad:
        for row in bad:
            print(f"error: {row['outcome']}: {row['fault']} ({row['target']}): {row['detail']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
