"""The package's import graph: acyclic, at most 8 levels, and train / evaluate / predict as
peers over one engine (no engine module imports them or the CLI, and they never import
each other). Counted with ``ast`` over the sources; imports under ``if TYPE_CHECKING:``
are for the type checker only and are not edges. The ``datasets`` sub-package is one
node (one room: a reader per format and the cache behind one ``load_split``). The
package's ``__init__`` (its face, re-exporting the API) is a node whose imports are
edges: it may import anything, and nothing may import it (``from . import
__version__`` would be an edge back up to every front end). ``__main__`` (a shim for
``python -m negmargin``) is not a node.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "negmargin"
TOP = {"train", "evaluate", "predict", "cli"}  # the entry layer
FACE = "__init__"


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return parts[0] if parts else "__init__"  # datasets/* → datasets


def runtime_imports(path: Path) -> set[str]:
    """Package modules ``path`` imports at run time (relative imports, any depth)."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for child in node.body for n in ast.walk(child))
    here = list(path.relative_to(PKG).with_suffix("").parts)
    package = here[:-1]
    out = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom) or not node.level or id(node) in skip:
            continue
        base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
        if node.module:
            out.add(".".join([*base, *node.module.split(".")]))
            continue
        for alias in node.names:  # from . import x: a module, or a name of the package's face
            target = PKG.joinpath(*base, alias.name)
            is_module = target.with_suffix(".py").is_file() or (target / "__init__.py").is_file()
            out.add(".".join([*base, alias.name]) if is_module else ".".join(base) or FACE)
    names = {t.split(".")[0] for t in out}  # datasets.cache → datasets
    return (names & graph_nodes()) - {module_name(path)}


@cache
def graph_nodes() -> frozenset[str]:
    return frozenset(module_name(p) for p in PKG.rglob("*.py")) - {"__main__"}


@cache
def graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for p in PKG.rglob("*.py"):
        if module_name(p) in graph_nodes():
            edges.setdefault(module_name(p), set()).update(runtime_imports(p))
    return edges


def levels(edges: dict[str, set[str]]) -> dict[str, int]:
    """Level 1: imports nothing of the package; else 1 + the highest level it imports."""
    out: dict[str, int] = {}

    def level(m: str, stack: tuple[str, ...]) -> int:
        assert m not in stack, f"import cycle: {' → '.join([*stack, m])}"
        if m not in out:
            out[m] = 1 + max((level(d, (*stack, m)) for d in edges[m]), default=0)
        return out[m]

    for m in edges:
        level(m, ())
    return out


def test_import_graph_is_acyclic_and_at_most_eight_levels():
    edges = graph()
    assert {"train", "evaluate", "predict", "cli", "config", "model", "features", "runtime"} <= set(edges)
    assert "finetune" in edges["meta_test"] and "config" in edges["train"]  # the parser sees real edges
    height = max(levels(edges).values())
    assert height <= 8, sorted(levels(edges).items(), key=lambda kv: -kv[1])


def test_train_evaluate_predict_are_peers_over_the_engine():
    edges = graph()
    engine = set(edges) - TOP - {FACE}
    for m in engine:
        assert not edges[m] & TOP, f"engine module {m} imports {edges[m] & TOP}"
    for m in ("train", "evaluate", "predict"):
        assert not edges[m] & (TOP - {m}), f"{m} imports {edges[m] & TOP}"
    lv = levels(edges)
    assert abs(lv["train"] - lv["evaluate"]) <= 1
    assert lv["cli"] > max(lv["train"], lv["evaluate"], lv["predict"])


def test_nothing_imports_the_package_face():
    edges = graph()
    assert edges[FACE] >= {"config", "predict", "_version"}  # the face's imports are counted
    importers = sorted(m for m, deps in edges.items() if FACE in deps)
    assert not importers, f"{importers} import the package face (negmargin/__init__.py)"
