"""The house rules, checked on the source: imports run one way, strategies are named only by the registry and their
own files, the model knows nothing of the mesh, and configuration is read when called, not at import."""

import ast
import re
from pathlib import Path

import pytest

from apb_jax import strategies

ROOT = Path(__file__).resolve().parents[1]
# a package may import only the packages after it in this order (and itself)
ORDER = ("pallas_kernels", "apb_jax", "converters", "benchmarks", "training", "notebooks")
LIBRARY = ("pallas_kernels", "apb_jax", "converters")


def _py(pkg: str) -> list[Path]:
    return sorted(p for p in (ROOT / pkg).rglob("*.py") if ".ipynb_checkpoints" not in p.parts)


def _imports(path: Path) -> set[str]:
    """Top-level package names `path` imports (at any depth: lazy imports inside functions count)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out


@pytest.mark.parametrize("pkg", [p for p in ORDER if (ROOT / p).is_dir()])
def test_imports_run_one_way(pkg):
    """pallas_kernels <- apb_jax <- converters, benchmarks, training, notebooks: nothing imports a later floor."""
    higher = set(ORDER[ORDER.index(pkg) + 1 :])
    if pkg in ("converters", "benchmarks", "training"):  # these three sit side by side above the library
        higher -= {"converters", "benchmarks", "training"} - {pkg}
        higher.add("tests")
    bad = [(str(p.relative_to(ROOT)), sorted(_imports(p) & higher)) for p in _py(pkg) if _imports(p) & higher]
    assert not bad, f"imports that run back up the floors: {bad}"


def test_library_never_edits_sys_path():
    bad = []
    for pkg in LIBRARY:
        for p in _py(pkg):
            for node in ast.walk(ast.parse(p.read_text())):
                if isinstance(node, ast.Attribute) and node.attr == "path" and getattr(node.value, "id", "") == "sys":
                    bad.append(str(p.relative_to(ROOT)))
    assert not bad, f"sys.path edits in library code: {sorted(set(bad))}"


def test_strategies_are_named_only_by_the_registry_and_their_own_files():
    names = set(strategies.names())
    allowed = {ROOT / "apb_jax" / "strategies" / "__init__.py"}
    bad = []
    for pkg in LIBRARY:
        for p in _py(pkg):
            if p in allowed or (p.parent == ROOT / "apb_jax" / "strategies" and p.stem in names):
                continue
            for node in ast.walk(ast.parse(p.read_text())):
                if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names:
                    bad.append(f"{p.relative_to(ROOT)}:{node.lineno} {node.value!r}")
    assert not bad, f"strategy names outside the registry and their own files: {bad}"


def test_every_strategy_is_one_file_that_imports_no_other_strategy():
    folder = ROOT / "apb_jax" / "strategies"
    for name, unit in strategies.REGISTRY.items():
        f = folder / f"{name}.py"
        assert f.is_file(), f"strategy {name!r} has no file {f.name}"
        assert unit.name == name and unit.summary
        mods = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("apb_jax.strategies."):
                mods.add(node.module.rsplit(".", 1)[1])
        assert mods <= {"base"}, f"{f.name} imports other strategies: {sorted(mods - {'base'})}"


def test_the_model_knows_nothing_of_the_mesh():
    for p in _py("apb_jax/models"):
        src = p.read_text()
        for word in ("shard_map", "all_gather", "ppermute", "axis_index", "Mesh", "strategies"):
            assert word not in src, f"{p.relative_to(ROOT)} mentions {word}"


def test_no_environment_read_at_import():
    """Configuration is read when called: no os.environ / os.getenv at module level of the library."""
    bad = []
    for pkg in LIBRARY:
        for p in _py(pkg):
            tree = ast.parse(p.read_text())
            for stmt in tree.body:
                if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    continue
                for node in ast.walk(stmt):
                    if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv"):
                        bad.append(f"{p.relative_to(ROOT)}:{node.lineno}")
    assert not bad, f"environment read at import: {bad}"


def test_code_and_docs_explain_themselves_without_outside_notes():
    """Comments and docs say what the code does and why, not where a tracker or a private note said it: no issue
    numbers and no citations of documents outside the repository."""
    pattern = re.compile(r"(?i:\bissue #?\d+)|\b[A-Z]+_SPEC(\.md)?\b|ARCHITECTURE\.md")
    files = [p for pkg in ORDER if (ROOT / pkg).is_dir() for p in _py(pkg)]
    files += sorted((ROOT / "tests").rglob("*.py")) + sorted(ROOT.glob("*.md")) + sorted(ROOT.rglob("NOTES.md"))
    bad = []
    for p in files:
        if p == Path(__file__).resolve():
            continue
        for i, line in enumerate(p.read_text().splitlines(), 1):
            if m := pattern.search(line):
                bad.append(f"{p.relative_to(ROOT)}:{i} {m.group(0)!r}")
    assert not bad, f"outside notes cited: {bad}"
