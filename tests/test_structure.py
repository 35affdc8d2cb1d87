"""The shape of the package, read from its imports with ``ast`` (nothing is imported but in one subprocess):
no import cycle among ``pipeline/`` modules; folders by stage, each importing only earlier stages, the
shared plumbing at the top and the estimators as a library under every stage; only
``pipeline/extract/cache/`` opens HDF5; engines produce and never import the stage that writes their
batches; the estimators import without TensorFlow; and no module outgrows a screenful of screens."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "pipeline"
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every pipeline module ``name`` imports, at module level or inside functions: both are edges a
    cycle can run through. ``from pipeline.x import y`` counts ``pipeline.x.y`` when that is a module."""
    found = set()
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    edges = set()
    for imp in found:
        while imp and imp not in known:  # pipeline.heads.registry.REGISTRY -> pipeline.heads.registry
            imp = imp.rpartition(".")[0]
        if imp and imp != name and not name.startswith(imp + "."):  # a module's own package is not an edge
            edges.add(imp)
    return edges


GRAPH = {n: _imports(n, p, set(_modules())) for n, p in _modules().items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as the list of modules around it, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m) :] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        state[n] = 2
        stack.pop()
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_no_import_cycle_among_pipeline_modules():
    assert _cycle(GRAPH) is None, " -> ".join(_cycle(GRAPH))


def test_the_cycle_finder_finds_a_planted_cycle():
    planted = {**GRAPH, "pipeline.errors": GRAPH["pipeline.errors"] | {"pipeline.extract.stage"}}
    assert _cycle(planted) is not None  # errors <- ... <- extract: closing it must be seen


def test_only_the_cache_package_opens_hdf5():
    users = {n for n, p in _modules().items() if "h5py" in _imports_raw(p)}
    assert users and all(n.startswith("pipeline.extract.cache.") for n in users), sorted(users)


def _imports_raw(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("engine", [n for n in GRAPH if n.startswith("pipeline.extract.engines")])
def test_engines_produce_and_never_import_the_stage_that_writes(engine):
    assert not GRAPH[engine] & {"pipeline.extract.stage", "pipeline.extract.cache.writer"}, GRAPH[engine]


def test_no_module_over_400_lines():
    long = {n: len(p.read_text().splitlines()) for n, p in _modules().items()}
    assert {n: k for n, k in long.items() if k > MAX_LINES} == {}


def test_every_module_says_why_it_exists():
    missing = [n for n, p in _modules().items() if p.stat().st_size and not ast.get_docstring(ast.parse(p.read_text()))]
    assert missing == []


# The flow of data, one folder a stage: a stage imports only the stages before it (heads and fine-tune are
# two sides of one comparison: neither imports the other), the estimators (a library under every stage)
# and the plumbing at the top, which imports no stage at all. ``curve`` and ``cli`` drive stages.
FLOW = {"data": 0, "backbones": 1, "extract": 2, "heads": 3, "finetune": 3, "forecast": 4, "report": 5, "apply": 6}
PLUMBING = {"artifacts", "config", "errors", "lock", "resources", "results", "uptodate"}
DRIVERS = {"__main__", "api", "cli", "curve"}


def _top(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def _wrong_way(graph: dict[str, set[str]]) -> list[str]:
    """Every import that runs against the flow, as "importer -> imported"."""
    bad = []
    for name, targets in graph.items():
        here = _top(name)
        for target in targets:
            there = _top(target)
            if there == here or there in PLUMBING or here in DRIVERS or target == "pipeline":
                continue
            if here in PLUMBING or (here == "estimators") or there in DRIVERS:
                ok = False
            elif there == "estimators":
                ok = True
            else:
                ok = FLOW[there] < FLOW[here]
            if not ok:
                bad.append(f"{name} -> {target}")
    return sorted(bad)


def test_the_top_holds_the_plumbing_and_one_folder_per_stage():
    top = {
        p.stem if p.is_file() else p.name for p in ROOT.iterdir() if p.suffix == ".py" or (p / "__init__.py").exists()
    }
    assert top == PLUMBING | DRIVERS | set(FLOW) | {"estimators", "__init__"}, sorted(top)


def test_every_import_follows_the_flow_of_data():
    assert _wrong_way(GRAPH) == []


@pytest.mark.parametrize(
    ("importer", "imported"),
    [
        ("pipeline.data", "pipeline.heads.stage"),  # an early stage reaching forward
        ("pipeline.heads.fit", "pipeline.finetune.train"),  # one side of the comparison using the other
        ("pipeline.estimators.linear", "pipeline.extract.cache.reader"),  # the library depending on a stage
        ("pipeline.results", "pipeline.report"),  # plumbing depending on a stage
    ],
)
def test_the_flow_check_sees_a_planted_wrong_way_import(importer, imported):
    planted = {**GRAPH, importer: GRAPH[importer] | {imported}}
    assert _wrong_way(planted) == [f"{importer} -> {imported}"]


def test_the_estimators_and_what_reads_a_cache_import_without_tensorflow():
    light = [n for n in GRAPH if n.startswith("pipeline.estimators")] + [
        "pipeline.heads.registry",
        "pipeline.heads.compose",
        "pipeline.heads.fit",
        "pipeline.extract.cache.reader",
        "pipeline.report.stats",
    ]
    code = (
        "import sys\n"
        + "".join(f"import {n}\n" for n in light)
        + ("print(sorted(m for m in ('tensorflow', 'keras') if m in sys.modules))")
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# What code says is *why*, not what a run measured: numbers of runs go stale (they live in benchmarks/NOTES.md).
LAB_NUMBER = re.compile(
    r"~ ?\d|\b\d+(\.\d+)? ?(s|ms|min)\b|\d(\.\d+)?[x×] (as long|faster|slower|cheaper)|img/s|\b0\.\d{3,4}\b"
    r"|\bon the demo\b|\d+% of|\bmeasured: "
)
ALLOWED = {"~1e-7"}  # a property of float32, not of a run


def _prose(source: str):
    """Comments, docstrings and the config's help texts, each with its line."""
    import io
    import tokenize

    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            yield tok.start[0], tok.string
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Module)):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                yield node.body[0].lineno, doc
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "_opt":
            yield (
                node.lineno,
                " ".join(s.value for s in ast.walk(node) if isinstance(s, ast.Constant) and isinstance(s.value, str)),
            )


def lab_numbers(source: str) -> list[str]:
    found = []
    for line, text in _prose(source):
        hits = [m for m in LAB_NUMBER.finditer(text) if not any(a in text[m.start() : m.end() + 8] for a in ALLOWED)]
        if hits:
            found.append(f"{line}: {text[max(0, hits[0].start() - 30) : hits[0].end() + 30]!r}")
    return found


def test_code_comments_and_help_quote_no_measured_numbers():
    found = {n: lab_numbers(p.read_text()) for n, p in _modules().items()}
    assert {n: f for n, f in found.items() if f} == {}


def test_the_lab_number_check_sees_a_planted_one():
    planted = '"""Fast."""\n\n\ndef f():\n    """Called eagerly it took ~12 s."""\n    return 0  # was 0.8910\n'
    assert len(lab_numbers(planted)) == 2
