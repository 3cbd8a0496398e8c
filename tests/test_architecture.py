"""The package's shape, read from its source: no import circles, and training never imports the offline
data preparation, golf_dist/data/prep/ (docs/architecture.md draws the same graph)."""

from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "golf_dist"
OFFLINE = "golf_dist.data.prep"  # the offline shard writer, verifier and data set makers
LAYOUT = PACKAGE.parent / "docs" / "architecture.md"  # its "## Layout" section names every module and top entry


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the golf_dist modules it imports, at module level or inside a function alike."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from golf_dist.data import formats` imports the module golf_dist.data.formats
                targets = [
                    f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                    for a in node.names
                ]
            edges |= {t for t in targets if t in modules and t != name and t.startswith("golf_dist")}
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def test_the_graph_sees_known_imports():
    graph = import_graph()  # a parser that missed imports would pass the tests below vacuously
    assert "golf_dist.data.shard_reader" in graph["golf_dist.data.torch_loader"]
    assert "golf_dist.data.formats" in graph["golf_dist.data.torch_loader"]  # `from golf_dist.data import formats`
    assert "golf_dist.data.storage" in graph["golf_dist.data.prep.shard_files"]
    assert "golf_dist.training.distributed" in graph["golf_dist.training.backend"]  # `from ... import ... as ...`


def test_the_package_has_no_import_circle():
    assert find_cycle(import_graph()) is None


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_training_never_imports_the_offline_data_prep():
    graph = import_graph()
    offline = {name for name in graph if name == OFFLINE or name.startswith(OFFLINE + ".")}
    assert "golf_dist.data.prep.sharding" in offline
    for entry in (
        "golf_dist.training.trainer",
        "golf_dist.evaluation.workflow",
        "golf_dist.inference.deblur",
        "golf_dist.data.dali",
    ):
        assert not reachable(graph, entry) & offline, entry


def test_the_held_out_evaluation_reads_only_the_held_out_photographs_and_kernels():
    """golf-evaluate --held-out (golf_dist/evaluation/held_out.py) needs data/prep's list of held-out photographs
    and its held-out kernel shapes: both are plain functions of numpy and the installed packages, which write
    nothing. It must never reach what writes or verifies shards or makes the synthetic set (sharding, shard_files,
    shard_verify, gopro, synthetic, scenes): the rule above stays whole for training, the shards' evaluation,
    deblur and the loaders."""
    graph = import_graph()
    allowed = {f"{OFFLINE}.held_out", f"{OFFLINE}.kernels"}
    for entry in ("golf_dist.evaluation.held_out", "golf_dist.commands.evaluate"):
        reached = {name for name in reachable(graph, entry) if name.startswith(OFFLINE + ".")}
        assert reached == allowed, (entry, reached)  # equal: the check sees the imports it allows


def test_the_architecture_layout_names_every_module():
    layout = LAYOUT.read_text().split("## Layout", 1)[1]
    missing = [p.name for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" and p.name not in layout]
    assert not missing, f"docs/architecture.md's Layout leaves out {missing}"


def test_every_entry_point_answers_help(capsys):
    """pyproject.toml's [project.scripts] point at functions that exist and whose command lines parse --help;
    the launch/ and data_prep/ scripts are wrappers over the same modules."""
    import importlib

    import pytest

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+; the README also names 3.10

    scripts = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == {
        "golf-train",
        "golf-evaluate",
        "golf-deblur",
        "golf-benchmark",
        "golf-shard",
        "golf-export",
        "golf-experiment",
    }
    for name, target in scripts.items():
        module_name, func = target.split(":")
        module = importlib.import_module(module_name)
        assert callable(getattr(module, func)), target
        with pytest.raises(SystemExit) as stopped:
            module.main(["--help"])
        assert stopped.value.code == 0 and "usage:" in capsys.readouterr().out, name
        wrapper = {"shard": "data_prep/shard_gopro.py"}.get(
            module_name.rsplit(".", 1)[1], f"launch/{module_name.rsplit('.', 1)[1]}.py"
        )
        assert f"from {module_name} import cli" in (PACKAGE.parent / wrapper).read_text(), wrapper


def test_imports_follow_the_tiers_of_docs_architecture():
    """docs/architecture.md's tier table lists every module once, and no import points to a higher tier."""
    text = (PACKAGE.parent / "docs" / "architecture.md").read_text().split("## Tiers", 1)[1]
    tiers: dict[str, int] = {}
    for rank, row in enumerate(line for line in text.splitlines() if line.startswith("| ") and "---" not in line):
        cells = [c.strip() for c in row.strip("|").split("|")]
        if cells[0] == "tier":
            continue
        for name in cells[1].split(","):
            module = "golf_dist" if name.strip() == "golf_dist" else f"golf_dist.{name.strip()}"
            assert module not in tiers, f"{module} listed twice"
            tiers[module] = rank  # 1 = the top tier
    graph = import_graph()
    assert set(tiers) == set(graph), (set(graph) - set(tiers), set(tiers) - set(graph))
    upward = [(a, b) for a, targets in graph.items() for b in targets if tiers[b] < tiers[a]]
    assert not upward, f"imports up the tiers: {upward}"


def test_the_architecture_layout_names_every_top_level_entry():
    import subprocess

    import pytest

    root = PACKAGE.parent
    listed = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True)
    if listed.returncode != 0 or not listed.stdout:
        pytest.skip("not a git checkout")
    layout = LAYOUT.read_text().split("## Layout", 1)[1]
    top = {path.split("/", 1)[0] + ("/" if "/" in path else "") for path in listed.stdout.splitlines()}
    top -= {".gitignore"}
    named = {entry for entry in top if entry in layout or entry.rstrip("/") + "/run" in layout}
    assert named == top, f"docs/architecture.md's Layout leaves out {sorted(top - named)}"


def logical_lines(text: str) -> list[int]:
    """The line numbers where a statement ends: a call that the formatter spreads over ten lines counts once, and
    comments and blank lines not at all, so the size below is the code's, not its layout's."""
    tokens = tokenize.generate_tokens(io.StringIO(text).readline)
    return [token.start[0] for token in tokens if token.type == tokenize.NEWLINE]


def test_logical_lines_count_statements_not_layout():
    assert len(logical_lines("x = f(\n    1,\n    2,\n)\n# a comment\n\ny = 2\n")) == 2


def test_functions_and_modules_stay_readable():
    """No function in golf_dist longer than 65 statements, no module longer than 300: sizes in logical lines
    (statements), which ruff format does not change. The limits are those the hand-wrapped code met before ruff
    format (85 and 420 physical lines then: the trainer had 297 statements, the longest function 63); the point is
    that nothing grows back to the 350-line modules and 100-line functions the package once had."""
    long_functions, long_modules = [], []
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        ends = logical_lines(text)
        if len(ends) > 300:
            long_modules.append(f"{path.relative_to(PACKAGE)}: {len(ends)} statements")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                size = sum(1 for end in ends if node.lineno <= end <= node.end_lineno)
                if size > 65:
                    long_functions.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name}: {size}")
    assert not long_functions and not long_modules, (long_functions, long_modules)
