"""The fault-injection suite (issue 9): real faults injected into real runs, one JSON line of outcome per
test in runs/faults/results.jsonl (or $GOLF_FAULT_RESULTS); launch/reliability_table.py makes docs/reliability.md's
table from it. A package, so that its conftest does not shadow tests/conftest.py's module name."""
