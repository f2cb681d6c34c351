"""The house rules, read from the source: floors, circles, private names, sizes, public docs.

Every module of ``pipeline/`` and ``stages/`` is parsed (never imported) and each import is
found wherever it is written: at module level, inside functions, under ``if TYPE_CHECKING:``,
relative (``from ..x import y``), or named by a string (``importlib.import_module("x")``,
``__import__("x")``, or any string constant that is exactly the dotted name of one of our modules,
so a table of lazy imports such as ``{"Name": "stages._langchain"}`` counts too; a logger's name
such as ``getLogger("pipeline.server")`` does not).

The three floors (an import arrow never climbs one):

0. runtime: ``pipeline`` itself and the modules directly in ``pipeline/`` (``pipeline._stage``);
1. stages: ``stages`` and everything under ``stages/``;
2. applications: the subpackages of ``pipeline/`` (``pipeline.jobs``, ``pipeline.server``,
   ``pipeline.cli``, ``pipeline.testing``) and ``pipeline.__main__``, which is the command line's
   entry point and nothing else. Applications may import each other.

Circles: modules are the nodes and every import above is an edge, type-only imports included (a
circle a reader has to hold in mind is a circle whether or not Python executes it). A package
face (``__init__.py``) is a module like any other: its re-exports are edges, so a module that
imports its own package's face while the face imports it is reported. Importing
``pipeline.jobs._job`` is *not* counted as importing the faces ``pipeline`` and
``pipeline.jobs``: Python initialises parent packages first, and a face that imports its own
submodules would otherwise be a circle by construction.

Private names: a leading underscore (not a dunder) means "this module only". Reported are
``from x import _y`` where ``x`` is one of our modules and ``x._y`` is not a module,
``x._y`` where ``x`` is one of our modules, and ``obj._y`` where ``obj`` is not ``self``/``cls``
unless this module is the only one of ours that defines an attribute ``_y`` (types are not
inferred: an attribute defined here and elsewhere too is taken to be the other module's, as
``results._run.state`` in the job engine and ``outbox._run`` in the stages were). Importing a
public name from a private module (``from stages.llm._caller import LLMCaller``) is fine inside
the library.

Sizes: no file over 700 lines, no function over 80 lines (``def`` to last line, docstring and
nested functions included).

Docs and examples (``docs/*.md`` and ``README.md`` python blocks, ``examples/*.py``) import only
public names: no path component and no imported name starting with an underscore.

Allowlists: what does not comply yet, in files other helpers are splitting right now, is named
below with who is splitting it. They may only shrink: a test fails when an entry is no longer
needed, so whoever fixes a file removes its entry in the same commit.
"""

from __future__ import annotations

import ast
import dataclasses
import itertools
import re
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("pipeline", "stages")
MAX_FILE_LINES = 700
MAX_FUNCTION_LINES = 80

# Public despite the underscore: the namedtuple API, and two standard-library entry points.
PUBLIC_UNDERSCORED = {"_replace", "_asdict", "_fields", "_make", "_field_defaults"}

# --------------------------------------------------------------------------- allowlists
# Each entry: what breaks a rule today -> who is splitting that file. Remove an entry in the same
# commit that makes it comply; test_allowlists_only_name_what_still_breaks enforces that.

OVERSIZE_FILES: dict[str, str] = {}

LONG_FUNCTIONS: dict[str, str] = {}

LAYER_EXCEPTIONS: dict[tuple[str, str], str] = {}

CYCLE_EXCEPTIONS: dict[frozenset[str], str] = {}

DOCS_EXCEPTIONS: dict[str, str] = {}

PRIVATE_EXCEPTIONS: dict[str, str] = {}


# --------------------------------------------------------------------------- reading the source


@dataclasses.dataclass(frozen=True)
class Import:
    """One arrow: ``source`` uses ``target`` (both our module names) at ``path:line``."""

    source: str
    target: str
    path: str
    line: int
    how: str  # "import", "from", "string"


@dataclasses.dataclass(frozen=True)
class Finding:
    """One broken rule, with where it is and a key an allowlist can name."""

    path: str
    line: int
    message: str
    key: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


@dataclasses.dataclass
class Module:
    """A parsed module of the tree."""

    name: str
    path: Path
    rel: str
    tree: ast.Module
    is_package: bool

    @property
    def package(self) -> str:
        """The package relative imports start from."""
        return self.name if self.is_package else self.name.rpartition(".")[0]


def discover(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, Module]:
    """Parse every ``.py`` file under each package directory of ``root``."""
    modules: dict[str, Module] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts.pop()
            name = ".".join(parts)
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            rel = path.relative_to(root).as_posix()
            modules[name] = Module(name, path, rel, tree, is_package)
    return modules


def _resolve_from(module: Module, node: ast.ImportFrom) -> str:
    """The absolute module name a ``from ... import`` statement reads from."""
    if not node.level:
        return node.module or ""
    base = module.package.split(".")
    if node.level > 1:
        base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _ours(name: str, modules: dict[str, Module]) -> str | None:
    """The deepest of our modules that ``name`` (a dotted module path) designates, if any."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def _string_arg(call: ast.Call) -> str | None:
    func = call.func
    called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    if called not in {"import_module", "__import__"} or not call.args:
        return None
    first = call.args[0]
    if isinstance(first, ast.Constant) and isinstance(first.value, str):
        return first.value
    return None


def imports_of(module: Module, modules: dict[str, Module]) -> Iterator[tuple[Import, list[str]]]:
    """Yield each arrow from ``module`` to one of ours, with the names a ``from`` took."""
    logger_lines = {
        node.lineno
        for node in ast.walk(module.tree)
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "getLogger"
    }
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _ours(alias.name, modules)
                if target is not None:
                    yield Import(module.name, target, module.rel, node.lineno, "import"), []
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_from(module, node)
            if _ours(base, modules) is None and base not in modules:
                continue
            taken: list[str] = []
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in modules:  # from package import submodule
                    yield Import(module.name, sub, module.rel, node.lineno, "from"), []
                else:
                    taken.append(alias.name)
            if taken:
                target = _ours(base, modules)
                assert target is not None
                yield Import(module.name, target, module.rel, node.lineno, "from"), taken
        elif isinstance(node, ast.Call):
            named = _string_arg(node)
            if named is not None and not named.startswith("."):
                target = _ours(named, modules)
                if target is not None:
                    yield Import(module.name, target, module.rel, node.lineno, "string"), []
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            named = node.value
            ours = "." in named and named in modules and named != module.name
            if ours and node.lineno not in logger_lines:
                yield Import(module.name, named, module.rel, node.lineno, "string"), []


def all_imports(modules: dict[str, Module]) -> list[tuple[Import, list[str]]]:
    """Every arrow between our modules, deduplicated by (source, target, line)."""
    seen: set[tuple[str, str, int]] = set()
    found = []
    for module in modules.values():
        for arrow, taken in imports_of(module, modules):
            key = (arrow.source, arrow.target, arrow.line)
            if arrow.source == arrow.target or (key in seen and not taken):
                continue
            seen.add(key)
            found.append((arrow, taken))
    return found


# --------------------------------------------------------------------------- the rules


def floor(name: str, modules: dict[str, Module]) -> int:
    """0 runtime, 1 stages, 2 applications (see the module docstring)."""
    parts = name.split(".")
    if parts[0] == "stages":
        return 1
    if len(parts) == 1:
        return 0
    if len(parts) == 2 and parts[1] != "__main__" and not modules[name].is_package:
        return 0
    return 2


FLOOR_NAMES = ("runtime", "stages", "applications")


def check_layers(modules: dict[str, Module]) -> list[Finding]:
    """Arrows that climb a floor."""
    found = []
    for arrow, _ in all_imports(modules):
        low, high = floor(arrow.source, modules), floor(arrow.target, modules)
        if high > low:
            found.append(
                Finding(
                    arrow.path,
                    arrow.line,
                    f"{arrow.source} ({FLOOR_NAMES[low]}) imports {arrow.target}"
                    f" ({FLOOR_NAMES[high]}, a higher floor) by {arrow.how}",
                    f"{arrow.source} -> {arrow.target}",
                )
            )
    return found


def check_cycles(modules: dict[str, Module]) -> list[Finding]:
    """Circles between modules, each reported once with its path."""
    graph: dict[str, dict[str, Import]] = {name: {} for name in modules}
    for arrow, _ in all_imports(modules):
        graph[arrow.source].setdefault(arrow.target, arrow)
    found = []
    for component in _strongly_connected(graph):
        if len(component) < 2:
            continue
        members = set(component)
        start = min(component)
        path = _path_back(graph, start, members)
        steps = [graph[a][b] for a, b in itertools.pairwise(path)]
        where = ", ".join(f"{s.source} -> {s.target} at {s.path}:{s.line}" for s in steps)
        found.append(
            Finding(
                steps[0].path,
                steps[0].line,
                f"import circle {' -> '.join(path)} ({where}); all members: {sorted(members)}",
                " ".join(sorted(members)),
            )
        )
    return found


def _strongly_connected(graph: dict[str, dict[str, Import]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative (the graph is small, but recursion limits are not)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
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
                components.append(component)
    return components


def _path_back(graph: dict[str, dict[str, Import]], start: str, members: set[str]) -> list[str]:
    """The shortest path from ``start`` back to itself inside one strongly connected set."""
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph[node]):
                if child not in members:
                    continue
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [start, *reversed(path[:-1]), start] if len(path) > 1 else [start, start]
                if child not in parents:
                    parents[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"no circle through {start}")  # pragma: no cover - SCC guarantees one


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _defined_attributes(tree: ast.Module) -> set[str]:
    """Attribute names the module itself defines (on ``self``, in class bodies, in slots)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, (ast.Store, ast.Del)):
            names.add(node.attr)
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    names.add(item.name)
                elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    names.add(item.target.id)
                elif isinstance(item, ast.Assign):
                    for target in item.targets:
                        if isinstance(target, ast.Name):
                            names.add(target.id)
                            if target.id == "__slots__":
                                names.update(
                                    c.value
                                    for c in ast.walk(item.value)
                                    if isinstance(c, ast.Constant) and isinstance(c.value, str)
                                )
        elif isinstance(node, ast.keyword) and node.arg:  # dataclasses.replace(x, _y=...)
            names.add(node.arg)
    return names


def _module_aliases(module: Module, modules: dict[str, Module]) -> dict[str, str]:
    """Local names bound to one of our modules (``import x.y as z``, ``from x import y``)."""
    aliases: dict[str, str] = {}
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname and alias.name in modules:
                    aliases[alias.asname] = alias.name
                elif not alias.asname:
                    top = alias.name.split(".")[0]
                    if top in modules:
                        aliases[top] = top
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_from(module, node)
            for alias in node.names:
                if f"{base}.{alias.name}" in modules:
                    aliases[alias.asname or alias.name] = f"{base}.{alias.name}"
    return aliases


def _external_modules(tree: ast.Module, ours: dict[str, str]) -> set[str]:
    """Local names bound to other libraries' modules (``os._exit`` is theirs to name)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                local = alias.asname or alias.name.split(".")[0]
                if local not in ours:
                    names.add(local)
    return names


def _module_of(expr: ast.expr, aliases: dict[str, str], modules: dict[str, Module]) -> str | None:
    """The module an expression such as ``pipeline.jobs`` or ``llm_module`` names, if any."""
    if isinstance(expr, ast.Name):
        return aliases.get(expr.id)
    if isinstance(expr, ast.Attribute):
        parent = _module_of(expr.value, aliases, modules)
        if parent is not None and f"{parent}.{expr.attr}" in modules:
            return f"{parent}.{expr.attr}"
    return None


def check_private(modules: dict[str, Module]) -> list[Finding]:
    """Private names that cross a module boundary."""
    found = []
    for arrow, taken in all_imports(modules):
        for name in taken:
            if _private(name) and name not in PUBLIC_UNDERSCORED:
                found.append(
                    Finding(
                        arrow.path,
                        arrow.line,
                        f"{arrow.source} imports the private name {name!r} from {arrow.target};"
                        " make it public in its module",
                        f"{arrow.source}: from {arrow.target} import {name}",
                    )
                )
    defined_by: dict[str, set[str]] = {}
    for module in modules.values():
        for attr in _defined_attributes(module.tree):
            defined_by.setdefault(attr, set()).add(module.name)
    for module in modules.values():
        aliases = _module_aliases(module, modules)
        defined = _defined_attributes(module.tree)
        external = _external_modules(module.tree, aliases)
        for node in ast.walk(module.tree):
            if not isinstance(node, ast.Attribute) or not _private(node.attr):
                continue
            if node.attr in PUBLIC_UNDERSCORED:
                continue
            owner = _module_of(node.value, aliases, modules)
            if owner is not None:
                if f"{owner}.{node.attr}" in modules:
                    continue  # a private submodule, reached as a module
                found.append(
                    Finding(
                        module.rel,
                        node.lineno,
                        f"{module.name} reads the private name {owner}.{node.attr}",
                        f"{module.name}: {owner}.{node.attr}",
                    )
                )
                continue
            value = node.value
            if isinstance(value, ast.Name) and value.id in {"self", "cls"} | external:
                continue
            if isinstance(value, ast.Call) and getattr(value.func, "id", None) == "super":
                continue
            if node.attr in defined and defined_by[node.attr] == {module.name}:
                continue  # only this module defines it: one of its own objects
            text = ast.unparse(node)
            found.append(
                Finding(
                    module.rel,
                    node.lineno,
                    f"{module.name} reaches into {text}, a private attribute of another module's"
                    " class; give its owner a public way to do this",
                    f"{module.name}: {text}",
                )
            )
    return found


def _function_spans(tree: ast.Module) -> Iterator[tuple[str, int, int]]:
    """Yield (qualified name, first line, line count) for every function and method."""

    def walk(node: ast.AST, prefix: str) -> Iterator[tuple[str, int, int]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                end = child.end_lineno or child.lineno
                yield name, child.lineno, end - child.lineno + 1
                yield from walk(child, f"{name}.")
            elif isinstance(child, ast.ClassDef):
                yield from walk(child, f"{prefix}{child.name}.")
            else:
                yield from walk(child, prefix)

    yield from walk(tree, "")


def check_sizes(modules: dict[str, Module]) -> list[Finding]:
    """Files over ``MAX_FILE_LINES`` and functions over ``MAX_FUNCTION_LINES``."""
    found = []
    for module in modules.values():
        lines = len(module.path.read_text(encoding="utf-8").splitlines())
        if lines > MAX_FILE_LINES:
            found.append(
                Finding(
                    module.rel,
                    1,
                    f"{lines} lines (limit {MAX_FILE_LINES}); split it by concept",
                    module.rel,
                )
            )
        for name, line, count in _function_spans(module.tree):
            if count > MAX_FUNCTION_LINES:
                found.append(
                    Finding(
                        module.rel,
                        line,
                        f"{name} is {count} lines (limit {MAX_FUNCTION_LINES})",
                        f"{module.rel}::{name}",
                    )
                )
    return found


PY_BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)


def public_sources(root: Path) -> Iterator[tuple[str, int, str]]:
    """Yield (where, first line, code) for every docs block and example users copy from."""
    pages = [root / "README.md", *sorted((root / "docs").glob("*.md"))]
    for page in pages:
        if not page.exists():
            continue
        text = page.read_text(encoding="utf-8")
        for match in PY_BLOCK.finditer(text):
            line = text.count("\n", 0, match.start(1)) + 1
            yield page.relative_to(root).as_posix(), line, match.group(1)
    for example in sorted((root / "examples").glob("**/*.py")):
        yield example.relative_to(root).as_posix(), 1, example.read_text(encoding="utf-8")


def check_public_docs(root: Path) -> list[Finding]:
    """Imports in docs and examples that name a private module or a private name."""
    found = []
    for where, first, code in public_sources(root):
        try:
            tree = ast.parse(textwrap.dedent(code))
        except SyntaxError as error:
            found.append(Finding(where, first, f"code block does not parse: {error}", where))
            continue
        for node in ast.walk(tree):
            names: list[tuple[str, list[str]]] = []
            if isinstance(node, ast.Import):
                names = [(alias.name, []) for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [(node.module, [alias.name for alias in node.names])]
            elif isinstance(node, ast.Call):
                named = _string_arg(node)
                names = [(named, [])] if named else []
            for path, taken in names:
                if path.split(".")[0] not in PACKAGES:
                    continue
                bad = [p for p in path.split(".") if _private(p)]
                bad += [t for t in taken if _private(t)]
                if bad:
                    line = first + node.lineno - 1
                    found.append(
                        Finding(
                            where,
                            line,
                            f"imports private {', '.join(bad)} via {path}; use the public package",
                            f"{where}: {path}",
                        )
                    )
    return found


# --------------------------------------------------------------------------- the tests


@pytest.fixture(scope="module")
def tree() -> dict[str, Module]:
    return discover(ROOT)


@pytest.fixture(scope="module")
def findings(tree: dict[str, Module]) -> dict[str, list[Finding]]:
    """Every rule's findings on the real tree, computed once for the tests below."""
    return {
        "layers": check_layers(tree),
        "cycles": check_cycles(tree),
        "private": check_private(tree),
        "sizes": check_sizes(tree),
        "docs": check_public_docs(ROOT),
    }


ALLOWED: dict[str, dict[str, str]] = {
    "layers": {f"{a} -> {b}": why for (a, b), why in LAYER_EXCEPTIONS.items()},
    "cycles": {" ".join(sorted(k)): why for k, why in CYCLE_EXCEPTIONS.items()},
    "private": PRIVATE_EXCEPTIONS,
    "sizes": {**OVERSIZE_FILES, **LONG_FUNCTIONS},
    "docs": DOCS_EXCEPTIONS,
}


def _unexcused(found: list[Finding], allowed: dict[str, str]) -> list[str]:
    return [str(f) for f in found if f.key not in allowed]


def _stale(found: list[Finding], allowed: dict[str, str], label: str) -> list[str]:
    keys = {f.key for f in found}
    gone = [key for key in allowed if key not in keys]
    return [f"{label}[{key!r}] no longer breaks a rule: remove it" for key in gone]


def test_no_import_climbs_a_floor(findings: dict[str, list[Finding]]) -> None:
    assert _unexcused(findings["layers"], ALLOWED["layers"]) == []


def test_no_import_circles(findings: dict[str, list[Finding]]) -> None:
    assert _unexcused(findings["cycles"], ALLOWED["cycles"]) == []


def test_no_private_name_crosses_a_module(findings: dict[str, list[Finding]]) -> None:
    assert _unexcused(findings["private"], ALLOWED["private"]) == []


def test_files_and_functions_stay_small(findings: dict[str, list[Finding]]) -> None:
    assert _unexcused(findings["sizes"], ALLOWED["sizes"]) == []


def test_docs_and_examples_import_only_public_names(findings: dict[str, list[Finding]]) -> None:
    assert _unexcused(findings["docs"], ALLOWED["docs"]) == []


@pytest.mark.parametrize("rule", sorted(ALLOWED))
def test_allowlists_only_name_what_still_breaks(
    findings: dict[str, list[Finding]], rule: str
) -> None:
    stale = _stale(findings[rule], ALLOWED[rule], f"the {rule} allowlist")
    assert stale == [], "tests/test_architecture.py: an allowlist names what now complies"


def test_the_runtime_has_no_http_client_and_no_file_formats(tree: dict[str, Module]) -> None:
    banned = {"aiohttp", "httpx", "pyarrow", "csv", "fastapi", "redis", "ray"}
    found = []
    for name, module in tree.items():
        if floor(name, tree) != 0:
            continue
        for node in ast.walk(module.tree):
            if isinstance(node, ast.Import):
                tops = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                tops = [node.module.split(".")[0]]
            else:
                continue
            found += [f"{module.rel}:{node.lineno}: {top}" for top in tops if top in banned]
    assert found == []


# --------------------------------------------------------------------------- the checkers can fail
# Each rule run on a small tree in tmp_path holding one deliberate violation: a checker that could
# not fail would pass these by reporting nothing, so these prove each one reports what it must.


def _tree(root: Path, files: dict[str, str]) -> dict[str, Module]:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")
    for package in PACKAGES:
        (root / package).mkdir(exist_ok=True)
        (root / package / "__init__.py").touch()
    return discover(root)


CLIMBS = {
    "in a function": ("pipeline/_core.py", "def late():\n    from stages import x\n"),
    "under TYPE_CHECKING": (
        "pipeline/_core.py",
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pipeline.jobs import J\n",
    ),
    "relative": ("pipeline/_core.py", "from .jobs._job import run\n"),
    "by importlib string": (
        "stages/_s.py",
        "import importlib\ndef f():\n    return importlib.import_module('pipeline.jobs._job')\n",
    ),
    "by __import__": ("stages/_s.py", "__import__('pipeline.jobs')\n"),
    "in a lazy table": ("stages/_s.py", "LAZY = {'run': 'pipeline.jobs._job'}\n"),
}


@pytest.mark.parametrize("case", sorted(CLIMBS))
def test_layer_check_reports_an_import_up_a_floor(tmp_path: Path, case: str) -> None:
    rel, text = CLIMBS[case]
    tree = _tree(
        tmp_path,
        {
            rel: text,
            "pipeline/jobs/__init__.py": "",
            "pipeline/jobs/_job.py": "from stages import x\nfrom pipeline import y\n",
        },
    )
    found = check_layers(tree)
    assert len(found) == 1, found
    assert found[0].path == rel and "a higher floor" in found[0].message


def test_layer_check_allows_every_downward_and_sideways_arrow(tmp_path: Path) -> None:
    tree = _tree(
        tmp_path,
        {
            "pipeline/_a.py": "from ._b import x\nimport pipeline\n",
            "pipeline/_b.py": "x = 1\n",
            "stages/llm/__init__.py": "from pipeline._a import x\nfrom stages import y\n",
            "pipeline/jobs/__init__.py": "from stages.llm import x\nfrom pipeline.cli import m\n",
            "pipeline/cli/__init__.py": "from pipeline.jobs import x\n",
            "pipeline/__main__.py": "from pipeline.cli import main\n",
        },
    )
    assert check_layers(tree) == []


def test_cycle_check_reports_the_circle_path_through_a_function_level_import(
    tmp_path: Path,
) -> None:
    tree = _tree(
        tmp_path,
        {
            "pipeline/_a.py": "from ._b import x\n",
            "pipeline/_b.py": "from ._c import y\n",
            "pipeline/_c.py": "def f():\n    from pipeline._a import z\n",
        },
    )
    [found] = check_cycles(tree)
    assert "pipeline._a -> pipeline._b -> pipeline._c -> pipeline._a" in found.message
    assert "pipeline/_c.py:2" in found.message


def test_cycle_check_counts_a_face_but_not_the_parent_package_of_an_import(
    tmp_path: Path,
) -> None:
    files = {
        "pipeline/jobs/__init__.py": "from ._job import run\n",
        "pipeline/jobs/_job.py": "from pipeline.jobs._journal import J\n",
        "pipeline/jobs/_journal.py": "J = 1\n",
    }
    assert check_cycles(_tree(tmp_path / "ok", files)) == []
    files["pipeline/jobs/_journal.py"] = "from pipeline.jobs import run\n"  # the face, again
    [found] = check_cycles(_tree(tmp_path / "circle", files))
    assert found.key == "pipeline.jobs pipeline.jobs._job pipeline.jobs._journal"


PRIVATE = {
    "from x import _y": ("from pipeline._a import _helper\n", "'_helper'"),
    "relative from x import _y": ("from ._a import _Ledger\n", "'_Ledger'"),
    "module attribute": ("import pipeline._a as a\nv = a._helper()\n", "pipeline._a._helper"),
    "dotted module attribute": ("import pipeline._a\nv = pipeline._a._helper\n", "._helper"),
    "another module's object": ("def f(outbox):\n    return outbox._run.state\n", "outbox._run"),
    "another module's object via self": (
        "class J:\n    def f(self):\n        return self.results._run\n",
        "self.results._run",
    ),
}


@pytest.mark.parametrize("case", sorted(PRIVATE))
def test_private_check_reports_a_private_name_taken_from_another_module(
    tmp_path: Path, case: str
) -> None:
    text, named = PRIVATE[case]
    a = "class Outbox:\n    def __init__(self):\n        self._run = 1\n_helper = 2\n_Ledger = 3\n"
    tree = _tree(tmp_path, {"pipeline/_a.py": a, "pipeline/_b.py": text})
    [found] = check_private(tree)
    assert found.path == "pipeline/_b.py" and named in found.message


def test_private_check_allows_own_attributes_public_names_and_private_modules(
    tmp_path: Path,
) -> None:
    b = """
        import os
        from pipeline import _a
        from pipeline._a import Public
        class Box:
            __slots__ = ("_stream",)
            def __init__(self, other):
                self._stream = other
            def same(self, other: "Box"):
                return other._stream, _a.Public, os._exit, Public()._replace()
        """
    tree = _tree(tmp_path, {"pipeline/_a.py": "class Public: pass\n", "pipeline/_b.py": b})
    assert check_private(tree) == []


def test_size_check_reports_a_long_file_and_a_long_function(tmp_path: Path) -> None:
    def function(name: str, lines: int, indent: str = "") -> str:
        body = "".join(f"{indent}    x{i} = {i}\n" for i in range(lines - 1))
        return f"{indent}def {name}():\n{body}"

    fits = function("fits", MAX_FUNCTION_LINES)  # exactly the limit: fine
    too_long = "class C:\n" + function("long", MAX_FUNCTION_LINES + 1, indent="    ")
    a_file = "x = 1\n" * (MAX_FILE_LINES + 1)
    tree = _tree(tmp_path, {"pipeline/_a.py": fits + too_long, "pipeline/_b.py": a_file})
    found = {f.key for f in check_sizes(tree)}
    assert found == {"pipeline/_a.py::C.long", "pipeline/_b.py"}


def test_docs_check_reports_private_imports_in_docs_and_examples(tmp_path: Path) -> None:
    page = "Use it:\n\n```python\nimport pipeline\nfrom stages._ray import ray_transform\n```\n"
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "scaling.md").write_text(page)
    (tmp_path / "README.md").write_text("```python\nfrom pipeline import Pipeline\n```\n")
    (tmp_path / "examples").mkdir()
    (tmp_path / "examples" / "x.py").write_text("from pipeline.jobs import _check_files\n")
    found = sorted(str(f) for f in check_public_docs(tmp_path))
    assert found == [
        "docs/scaling.md:5: imports private _ray via stages._ray; use the public package",
        "examples/x.py:1: imports private _check_files via pipeline.jobs; use the public package",
    ]


def test_a_stale_allowlist_entry_is_reported() -> None:
    live = Finding("stages/_ray.py", 1, "too long", "stages/_ray.py")
    allowed = {"stages/_ray.py": "being split", "pipeline/jobs/_job.py": "being split"}
    assert _stale([live], allowed, "OVERSIZE_FILES") == [
        "OVERSIZE_FILES['pipeline/jobs/_job.py'] no longer breaks a rule: remove it"
    ]
