"""The layers run one way (docs/ARCHITECTURE.md): the import graph of the product, read with `ast`, counting
imports made inside functions (they are real edges at run time) and leaving out TYPE_CHECKING blocks."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("apprentice", "apprentice_cli", "factory", "quality_checks", "sft", "eval", "serve", "fakes")

# The only imports of project modules inside functions, each with its reason. Everything else is at the top
# of its module, where a reader sees it and a cycle cannot hide.
ALLOWED_LATE = {
    ("factory.__main__", "factory.commands"): "CLI: `--help` answers without loading the engine",
    ("sft.__main__", "sft.commands"): "CLI: `--help` answers without loading the trainer",
    ("eval.__main__", "eval.commands"): "CLI: `--help` answers without loading eval",
    ("serve.__main__", "serve.commands"): "CLI: `--help` answers without loading the server",
    ("factory.teachers", "factory.teachers.openai"): "teacher registry: only the backend a recipe names loads",
    ("factory.teachers", "factory.teachers.anthropic"): "teacher registry: only the backend a recipe names loads",
    ("factory.teachers", "factory.teachers.local"): "teacher registry: only the backend a recipe names loads",
    ("factory.teachers", "factory.teachers.vllm"): "teacher registry: only the backend a recipe names loads",
    ("factory.teachers", "factory.teachers.fleet"): "teacher registry: only the backend a recipe names loads",
    ("sft.train", "sft.trainers"): "it imports torch, TRL and peft (and the two trainer subclasses): only a training needs it",
}
CONFIG = {"apprentice.config", "factory.recipe", "factory.prompt_config", "sft.config", "sft.sweep_config",
          "eval.config", "serve.config", "quality_checks.registry"}
STORAGE = {"factory.records", "factory.store", "factory.cache", "factory.logprobs", "factory.review_ledger"}
ENGINE = {"factory.run", "factory.run_report", "factory.decide", "factory.online", "factory.batch", "factory.batch_ledger", "factory.asker",
          "factory.sources", "factory.answers", "factory.commands", "factory.plan", "factory.export",
          "factory.kd_export"}


def _modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            modules[name.removesuffix(".__init__")] = path
    return modules


def _resolve(modules: dict[str, Path], current: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    package = current if modules[current].name == "__init__.py" else current.rpartition(".")[0]
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            parts = package.split(".")
            parts = parts[: len(parts) - (node.level - 1)]
            base = ".".join(parts + ([base] if base else []))
        names = [base] + [f"{base}.{alias.name}" for alias in node.names]
    found = []
    for name in names:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        if name and name != current:
            found.append(name)
    return found


def import_graph() -> tuple[dict[str, set[str]], list[tuple[str, str, int]]]:
    """Edges module → modules it imports, and the imports made inside functions as (module, target, line)."""
    modules = _modules()
    edges: dict[str, set[str]] = {name: set() for name in modules}
    late: list[tuple[str, str, int]] = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skipped: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                skipped |= {id(child) for child in ast.walk(node)}

        def visit(node: ast.AST, in_function: bool) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.Import, ast.ImportFrom)) and id(child) not in skipped:
                    for target in sorted(set(_resolve(modules, name, child))):
                        edges[name].add(target)
                        if in_function:
                            late.append((name, target, child.lineno))
                visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))

        visit(tree, False)
    return edges, late


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


@pytest.fixture(scope="module")
def graph():
    return import_graph()


def test_the_cycle_finder_finds_a_cycle():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(edges) == [["a", "b", "c"]], "a → b → c → a is one cycle; d only points into it"


def test_no_import_cycle_among_project_modules(graph):
    edges, _ = graph
    assert _cycles(edges) == [], "import cycles (function-level imports counted)"


def test_function_level_imports_of_project_modules_are_the_allowed_ones(graph):
    _, late = graph
    unexpected = [f"{module}:{line} imports {target}" for module, target, line in late
                  if (module, target) not in ALLOWED_LATE]
    assert unexpected == [], "move these imports to the top of their module, or add them to ALLOWED_LATE with a reason"
    assert len(late) <= 10, f"{len(late)} function-level imports of project modules; at most 10"


def test_config_imports_no_behaviour(graph):
    edges, _ = graph
    wrong = {module: sorted(t for t in edges[module] if t not in CONFIG and not t.startswith("apprentice."))
             for module in CONFIG}
    assert {m: t for m, t in wrong.items() if t} == {}, "a config module imports a behaviour module"


def _shared(module: str) -> bool:
    return module == "apprentice" or module.startswith("apprentice.")


def test_the_shared_vocabulary_is_a_leaf(graph):
    edges, _ = graph
    wrong = {module: sorted(t for t in targets if not _shared(t))
             for module, targets in edges.items() if _shared(module)}
    assert {m: t for m, t in wrong.items() if t} == {}, "apprentice/ imports the packages built on it"


def test_the_apprentice_script_imports_only_the_stages_parsers(graph):
    """`apprentice --help` stays instant: the script reaches the stages through their argparse-only
    `__main__` modules, which import their commands once one is chosen."""
    edges, _ = graph
    parsers = {"factory", "factory.__main__", "sft", "sft.__main__", "eval", "eval.__main__", "serve", "serve.__main__"}
    beyond = sorted(t for t in edges["apprentice_cli"] | edges["apprentice_cli.__main__"]
                    if not _shared(t) and t not in parsers and t != "apprentice_cli")
    assert beyond == [], "the apprentice script imports more than the stages' parsers"


def test_storage_imports_no_check_teacher_or_engine(graph):
    edges, _ = graph
    above = ("quality_checks", "factory.teachers") + tuple(ENGINE)
    wrong = {module: sorted(t for t in edges[module] if t.startswith(above)) for module in STORAGE}
    assert {m: t for m, t in wrong.items() if t} == {}, "storage reaches up into checks, teachers or the engine"


def test_checks_import_no_engine_and_the_limiter_no_teacher(graph):
    edges, _ = graph
    wrong = {module: sorted(edges[module] & ENGINE) for module in edges if module.startswith("quality_checks")}
    assert {m: t for m, t in wrong.items() if t} == {}, "a check imports the engine; it declares what it needs"
    teachers = sorted(t for t in edges["factory.limiter"] if t.startswith("factory.teachers"))
    assert teachers == [], "the limiter imports a teacher module"


def test_no_product_module_imports_the_fakes(graph):
    edges, _ = graph
    wrong = {module: sorted(t for t in targets if t.startswith("fakes"))
             for module, targets in edges.items() if not module.startswith("fakes")}
    assert {m: t for m, t in wrong.items() if t} == {}, "the fakes are for tests and benchmarks only"


def test_no_product_module_over_500_lines_without_a_reason():
    documented = (REPO / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    long = [name for name, path in _modules().items()
            if not name.startswith("fakes") and len(path.read_text(encoding="utf-8").splitlines()) > 500
            and f"`{path.relative_to(REPO).as_posix()}`" not in documented]
    assert long == [], "over 500 lines: split it, or say why in docs/ARCHITECTURE.md (name it in backticks)"
