"""The package's layering, checked on its source with ``ast`` (nothing is imported or run).

Every ``.py`` file under ``amct_caffe/`` is parsed once. Every import statement counts, wherever it
is (module level, inside functions and methods, under ``if TYPE_CHECKING:``), and so does
``importlib.import_module("amct_caffe....")`` / ``__import__`` with a constant string.

Resolution of an import to a module of the package:

- ``import a.b.c`` -> ``a.b.c`` (the longest prefix that is a module of the package);
- ``from a.b import c`` -> ``a.b.c`` when ``a/b/c.py``, ``a/b/c/`` or ``a/b/c.pyi`` (a compiled
  extension's stub, e.g. ``_kernels``) exists, else ``a.b`` (``c`` is a name defined in ``a/b``);
- relative imports are made absolute from the importing module's package first.

Python also runs every parent package's ``__init__`` on the way to a submodule; those implicit
imports are not edges (otherwise every module would import the package root). A module importing a
*name* of its own package (``from amct_caffe.data import Record`` inside ``data/record.py``) is an
edge to that package's ``__init__``.

A *part* is a direct child of ``amct_caffe/``: a subpackage (``api``, ``passes``, ...) or a top-level
module (``cli``, ``ops``, ``errors``, ...); the package root itself is the part ``__init__``.
"""

from __future__ import annotations

import ast
import functools
from dataclasses import dataclass
from pathlib import Path

ROOT_PACKAGE = "amct_caffe"
PACKAGE_DIR = Path(__file__).resolve().parent.parent / ROOT_PACKAGE
REPO_DIR = PACKAGE_DIR.parent

MAX_LINES = 550

# test_only_api_and_cli_import_the_package_root: the only modules that may import the package root itself
# (``import amct_caffe`` or a name defined in ``amct_caffe/__init__.py``); every module of ``api/`` and ``cli/``
# may too.
ROOT_IMPORTERS = {"amct_caffe", "amct_caffe.__main__"}
ROOT_IMPORTER_PACKAGES = ("amct_caffe.api", "amct_caffe.cli")

# test_imports_point_down_the_layers: each part's rank, from DESIGN's list of layers (top = 0; an import
# must go to a larger rank).
#
#   api/, cli/         the guide's functions and the command line
#   passes/            graph transforms (the pipeline)
#   runtime/           the executor
#   quant/ config/ data/
#   io/                every file format (the record, BN dumps, outputs, the compiled schemas)
#   ir/                Graph / Node / Blob
#   ops                the layer-type registry, "at the bottom" (under everything but errors/log)
#   errors, log
#
# DESIGN lists passes above runtime only by order of listing: passes are graph transforms and need no
# executor, and the executor needs no pass, so they are peers (neither may import the other).
# quant, config and data are peers. DESIGN puts cli beside api/; it ranks above it here since the command
# line calls the guide's functions, never the reverse. The top group __main__ / cli / __init__ is ordered
# so that its legitimate imports point down: ``python -m amct_caffe`` (__main__) runs the command line,
# and the command line may use the root's public names while the root never imports the command line.
# ``_kernels`` is the compiled C++ extension (only a ``.pyi`` stub in the source tree); it imports
# nothing of the package, so it sits at the bottom.
RANKS = {
    "__main__": 0,
    "cli": 1,
    "__init__": 2,
    "api": 3,
    "passes": 4, "runtime": 4,
    "quant": 5, "config": 5, "data": 5,
    "io": 6,
    "ir": 7,
    "ops": 8,
    "errors": 9, "log": 9, "_kernels": 9,
}

# test_imports_point_down_the_layers: imports between two different parts of the same rank that are accepted, as
# (importing part, imported part) -> reason.
SAME_RANK_ALLOWED: dict[tuple[str, str], str] = {}

# test_no_import_cycle_between_modules_of_a_part: import cycles between the modules of one part that are accepted, as
# frozenset of module names (e.g. "amct_caffe.data", "amct_caffe.data.record") -> reason.
KNOWN_MODULE_CYCLES: dict[frozenset[str], str] = {}

# test_ir_does_not_reach_protobuf: DESIGN wants ir/ importable without protobuf; no module that ir/
# reaches through its imports may import these external packages.
IR_FORBIDDEN_EXTERNAL = ("google",)

MAX_CYCLES_SHOWN = 40


# ---------------------------------------------------------------------------------------------------
# Reading the package


@dataclass(frozen=True)
class Module:
    name: str  # dotted; a package's __init__ is the package's name
    path: Path | None  # None for a compiled extension or a directory without __init__.py
    is_package: bool

    @property
    def part(self) -> str:
        return part_of(self.name)

    @property
    def shown(self) -> str:
        return str(self.path.relative_to(REPO_DIR)) if self.path else self.name


@dataclass(frozen=True)
class Import:
    source: str  # importing module
    line: int
    text: str  # the statement, reduced to the names that lead to ``target``
    target: str  # imported module of the package
    names: tuple[str, ...]  # ``from X import a, b``: the names imported; () for ``import X``
    binds_module_as: tuple[str, ...]  # local names bound to ``target`` itself (for attribute checks)

    def where(self, modules: dict[str, Module]) -> str:
        return f"{modules[self.source].shown}:{self.line}"


@dataclass(frozen=True)
class ExternalImport:
    source: str
    line: int
    module: str  # absolute name of a module outside the package


def part_of(module: str) -> str:
    pieces = module.split(".")
    return "__init__" if len(pieces) == 1 else pieces[1]


def _discover_modules() -> dict[str, Module]:
    modules: dict[str, Module] = {ROOT_PACKAGE: Module(ROOT_PACKAGE, PACKAGE_DIR / "__init__.py", True)}
    for path in sorted(PACKAGE_DIR.rglob("*")):
        rel = path.relative_to(PACKAGE_DIR)
        if "__pycache__" in rel.parts:
            continue
        dotted = ".".join((ROOT_PACKAGE, *rel.parts))
        if path.is_dir():
            init = path / "__init__.py"
            modules[dotted] = Module(dotted, init if init.is_file() else None, True)
        elif path.suffix == ".py" and path.name != "__init__.py":
            modules[dotted[: -len(".py")]] = Module(dotted[: -len(".py")], path, False)
        elif path.suffix == ".pyi" or path.suffix in (".so", ".pyd"):
            name = ROOT_PACKAGE + "." + ".".join(rel.parts[:-1] + (path.name.split(".")[0],))
            modules.setdefault(name, Module(name, None, False))
    return modules


def _longest_module_prefix(name: str, modules: dict[str, Module]) -> str | None:
    pieces = name.split(".")
    for n in range(len(pieces), 0, -1):
        candidate = ".".join(pieces[:n])
        if candidate in modules:
            return candidate
    return None


def _absolute_from(module: Module, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module.name if module.is_package else module.name.rpartition(".")[0]
    pieces = package.split(".")
    if node.level - 1 > len(pieces) - 1:
        raise AssertionError(f"{module.shown}:{node.lineno}: relative import goes above {ROOT_PACKAGE}")
    base = ".".join(pieces[: len(pieces) - (node.level - 1)])
    return f"{base}.{node.module}" if node.module else base


def _is_internal(name: str) -> bool:
    return name == ROOT_PACKAGE or name.startswith(ROOT_PACKAGE + ".")


def _constant_import_call(node: ast.Call) -> str | None:
    """``importlib.import_module("x.y")`` / ``import_module("x.y")`` / ``__import__("x.y")``."""
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
    if name not in ("import_module", "__import__") or not node.args:
        return None
    arg = node.args[0]
    return arg.value if isinstance(arg, ast.Constant) and isinstance(arg.value, str) else None


def _imports_of(module: Module, tree: ast.AST, modules: dict[str, Module]):
    internal: list[Import] = []
    external: list[ExternalImport] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if not _is_internal(alias.name):
                    external.append(ExternalImport(module.name, node.lineno, alias.name))
                    continue
                target = _longest_module_prefix(alias.name, modules)
                if target is None:
                    raise AssertionError(f"{module.shown}:{node.lineno}: import {alias.name}: no such module")
                text = f"import {alias.name}" + (f" as {alias.asname}" if alias.asname else "")
                bound = (alias.asname,) if alias.asname and target == alias.name else ()
                internal.append(Import(module.name, node.lineno, text, target, (), bound))
        elif isinstance(node, ast.ImportFrom):
            base = _absolute_from(module, node)
            if not _is_internal(base):
                external.append(ExternalImport(module.name, node.lineno, base))
                continue
            by_target: dict[str, list[ast.alias]] = {}
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                target = sub if sub in modules else _longest_module_prefix(base, modules)
                if target is None:
                    raise AssertionError(f"{module.shown}:{node.lineno}: from {base} import: no such module")
                by_target.setdefault(target, []).append(alias)
            shown_base = "." * node.level + (node.module or "")
            for target, aliases in by_target.items():
                names = ", ".join(a.name + (f" as {a.asname}" if a.asname else "") for a in aliases)
                bound = tuple(a.asname or a.name for a in aliases if f"{base}.{a.name}" == target)
                internal.append(Import(module.name, node.lineno, f"from {shown_base} import {names}", target,
                                       tuple(a.name for a in aliases), bound))
        elif isinstance(node, ast.Call):
            name = _constant_import_call(node)
            if name is None:
                continue
            if not _is_internal(name):
                external.append(ExternalImport(module.name, node.lineno, name))
                continue
            target = _longest_module_prefix(name, modules)
            if target is not None:
                internal.append(Import(module.name, node.lineno, f"import_module({name!r})", target, (), ()))
    return internal, external


@dataclass(frozen=True)
class Package:
    modules: dict[str, Module]
    sources: dict[str, str]  # module name -> text, for modules with a .py file
    trees: dict[str, ast.AST]
    imports: tuple[Import, ...]
    external: tuple[ExternalImport, ...]


@functools.lru_cache(maxsize=1)
def package() -> Package:
    modules = _discover_modules()
    sources, trees, imports, external = {}, {}, [], []
    for module in modules.values():
        if module.path is None:
            continue
        text = module.path.read_text(encoding="utf-8")
        tree = ast.parse(text, filename=str(module.path))
        sources[module.name], trees[module.name] = text, tree
        internal, ext = _imports_of(module, tree, modules)
        imports += internal
        external += ext
    imports.sort(key=lambda i: (modules[i.source].shown, i.line, i.target))
    return Package(modules, sources, trees, tuple(imports), tuple(external))


# ---------------------------------------------------------------------------------------------------
# Cycles


def _strongly_connected(nodes, edges: dict[str, set[str]]) -> list[list[str]]:
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            out.append(sorted(component))

    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return out


def elementary_cycles(edges: dict[str, set[str]], limit: int) -> list[tuple[list[str], list[list[str]], bool]]:
    """Per group of mutually dependent nodes: (its nodes, its elementary cycles, whether they were cut at ``limit``).

    Each cycle is listed once, starting at its smallest node; self-loops are ignored.
    """
    nodes = set(edges) | {w for ws in edges.values() for w in ws}
    groups = []
    for component in _strongly_connected(nodes, edges):
        if len(component) < 2:
            continue
        members = set(component)
        cycles: list[list[str]] = []
        truncated = any(_cycles_from(start, start, [start], edges, members, cycles, limit) for start in component)
        groups.append((component, cycles, truncated))
    return groups


def _cycles_from(start, v, path, edges, members, cycles, limit) -> bool:
    """Append to ``cycles`` every cycle through ``start`` that extends ``path`` over nodes above ``start``."""
    for w in sorted(edges.get(v, ())):
        if w == start:
            cycles.append(path[:])
            if len(cycles) >= limit:
                return True
        elif w in members and w > start and w not in path:
            path.append(w)
            if _cycles_from(start, w, path, edges, members, cycles, limit):
                return True
            path.pop()
    return False


def _cycle_report(title: str, groups, example: dict[tuple[str, str], Import], label) -> str:
    modules = package().modules
    lines = [title]
    for component, cycles, truncated in groups:
        lines.append(f"group of {len(component)}: {', '.join(label(v) for v in component)}")
        lines.append(f"  {len(cycles)}{'+ (listing stopped)' if truncated else ''} cycle(s):")
        lines += ["    " + " -> ".join(label(v) for v in cycle + cycle[:1]) for cycle in cycles]
        lines.append("  edges of these cycles, one example import each:")
        used = sorted({(a, b) for cycle in cycles for a, b in zip(cycle, cycle[1:] + cycle[:1], strict=True)})
        for a, b in used:
            imp = example[(a, b)]
            lines.append(f"    {label(a)} -> {label(b)}: {imp.where(modules)}  {imp.text}")
    return "\n".join(lines)


def test_no_import_cycle_between_parts():
    pkg = package()
    edges: dict[str, set[str]] = {}
    example: dict[tuple[str, str], Import] = {}
    for imp in pkg.imports:
        a, b = part_of(imp.source), part_of(imp.target)
        if a != b:
            edges.setdefault(a, set()).add(b)
            example.setdefault((a, b), imp)
    groups = elementary_cycles(edges, MAX_CYCLES_SHOWN)
    assert not groups, _cycle_report(f"import cycles between the parts of {ROOT_PACKAGE}/:", groups, example, str)


def test_no_import_cycle_between_modules_of_a_part():
    pkg = package()
    edges: dict[str, set[str]] = {}
    example: dict[tuple[str, str], Import] = {}
    for imp in pkg.imports:
        if part_of(imp.source) == part_of(imp.target) and imp.source != imp.target:
            edges.setdefault(imp.source, set()).add(imp.target)
            example.setdefault((imp.source, imp.target), imp)
    groups = elementary_cycles(edges, MAX_CYCLES_SHOWN)
    found = {frozenset(c) for _, cycles, _ in groups for c in cycles}
    stale = [sorted(k) for k in KNOWN_MODULE_CYCLES if k not in found]
    assert not stale, f"KNOWN_MODULE_CYCLES lists cycles that no longer exist, remove them: {stale}"
    unexcused = []
    for component, cycles, truncated in groups:
        cycles = [c for c in cycles if frozenset(c) not in KNOWN_MODULE_CYCLES]
        if cycles:
            unexcused.append((component, cycles, truncated))
    assert not unexcused, _cycle_report("import cycles between modules of one part:", unexcused, example,
                                        lambda m: pkg.modules[m].shown)


# ---------------------------------------------------------------------------------------------------
# Who may import the package root


def _may_import_root(module: str) -> bool:
    return module in ROOT_IMPORTERS or any(module == p or module.startswith(p + ".") for p in ROOT_IMPORTER_PACKAGES)


def test_only_api_and_cli_import_the_package_root():
    pkg = package()
    offenders = [f"  {imp.where(pkg.modules)}  {imp.text}" for imp in pkg.imports
                 if imp.target == ROOT_PACKAGE and not _may_import_root(imp.source)]
    assert not offenders, (f"only {ROOT_PACKAGE}/__init__.py, __main__.py, cli/ and api/ may import the package root "
                           f"(``import {ROOT_PACKAGE}`` or a name of its __init__); import the submodule that "
                           "defines the name instead:\n" + "\n".join(offenders))


# ---------------------------------------------------------------------------------------------------
# Size


def test_no_module_over_the_line_limit():
    pkg = package()
    counts = {name: len(text.splitlines()) for name, text in pkg.sources.items()}
    offenders = [f"  {pkg.modules[name].shown}: {n} lines" for name, n in sorted(counts.items(), key=lambda kv: -kv[1])
                 if n > MAX_LINES]
    assert not offenders, f"modules over {MAX_LINES} lines (split them):\n" + "\n".join(offenders)


# ---------------------------------------------------------------------------------------------------
# api/ uses only public names


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_api_imports_no_private_names():
    pkg = package()
    offenders = []
    api = [m for m in pkg.trees if m == f"{ROOT_PACKAGE}.api" or m.startswith(f"{ROOT_PACKAGE}.api.")]
    for name in sorted(api):
        module = pkg.modules[name]
        tree = pkg.trees[name]
        module_aliases: set[str] = set()
        for imp in (i for i in pkg.imports if i.source == name):
            module_aliases.update(imp.binds_module_as)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                target = _absolute_from(module, node)
                private = [a.name for a in node.names if _private(a.name)]
                if private and target != name:
                    offenders.append(f"  {module.shown}:{node.lineno}  from {'.' * node.level}{node.module or ''} "
                                     f"import {', '.join(private)}")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.asname is None:
                        module_aliases.add(alias.name.split(".")[0])
                    elif not _is_internal(alias.name):
                        module_aliases.add(alias.asname)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in module_aliases and _private(node.attr)):
                offenders.append(f"  {module.shown}:{node.lineno}  {node.value.id}.{node.attr}")
    assert not offenders, ("api/ uses private names of other modules (make them public where they are defined, "
                           "or move the code):\n" + "\n".join(offenders))


# ---------------------------------------------------------------------------------------------------
# Layering direction


def test_every_part_has_a_rank():
    parts = {m.part for m in package().modules.values()}
    missing = sorted(parts - RANKS.keys())
    assert not missing, f"parts of {ROOT_PACKAGE}/ missing from RANKS in {Path(__file__).name}: {missing}"


def test_imports_point_down_the_layers():
    pkg = package()
    offenders = []
    for imp in pkg.imports:
        a, b = part_of(imp.source), part_of(imp.target)
        if a == b or a not in RANKS or b not in RANKS:
            continue
        if RANKS[b] < RANKS[a]:
            why = f"{a} (rank {RANKS[a]}) imports higher {b} (rank {RANKS[b]})"
        elif RANKS[b] == RANKS[a] and (a, b) not in SAME_RANK_ALLOWED:
            why = f"{a} imports its peer {b} (rank {RANKS[a]})"
        else:
            continue
        offenders.append(f"  {imp.where(pkg.modules)}  {why}: {imp.text}")
    stale = sorted(k for k in SAME_RANK_ALLOWED if not any(
        (part_of(i.source), part_of(i.target)) == k for i in pkg.imports))
    assert not stale, f"SAME_RANK_ALLOWED lists imports that no longer exist, remove them: {stale}"
    assert not offenders, ("imports against the layering (top to bottom: " +
                           " > ".join(", ".join(p for p in RANKS if RANKS[p] == r) for r in sorted(set(RANKS.values())))
                           + "):\n" + "\n".join(offenders))


def test_ir_does_not_reach_protobuf():
    """ir/ and everything it imports (explicitly) import no protobuf.

    Python would still run ``amct_caffe/__init__.py`` first on ``import amct_caffe.ir``; that implicit
    import is not followed here.
    """
    pkg = package()
    by_source: dict[str, list[Import]] = {}
    for imp in pkg.imports:
        by_source.setdefault(imp.source, []).append(imp)
    start = [m for m in pkg.modules if part_of(m) == "ir"]
    via: dict[str, Import | None] = {m: None for m in start}
    queue = list(start)
    while queue:
        m = queue.pop(0)
        for imp in by_source.get(m, ()):
            if imp.target not in via:
                via[imp.target] = imp
                queue.append(imp.target)
    offenders = []
    for ext in pkg.external:
        if ext.source in via and ext.module.split(".")[0] in IR_FORBIDDEN_EXTERNAL:
            chain, m = [], ext.source
            while via[m] is not None:
                chain.append(f"{via[m].where(pkg.modules)} {via[m].text}")
                m = via[m].source
            how = f"via {' -> '.join(reversed(chain))}" if chain else "directly"
            offenders.append(f"  {pkg.modules[ext.source].shown}:{ext.line} imports {ext.module} ({how})")
    assert not offenders, "ir/ must be importable without protobuf:\n" + "\n".join(offenders)
