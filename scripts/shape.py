"""The shape of the package, as numbers a reviewer can hold the code to (issue 38's goals):
the longest functions, the largest modules, import cycles between our modules, what model/
imports of ours, and how many names the trainer imports from us.

    python scripts/shape.py            # a report
    python scripts/shape.py --json     # the same as one JSON line

Imports are read from the source (ast), lazy ones inside functions included: a cycle through a
function-level import is still a cycle a reader has to hold in mind. Cycles are looked for in
gemma3_tune/ and among scripts/*.py.
"""

from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "gemma3_tune"


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def our_imports(path: Path, tree: ast.AST) -> list[tuple[str, list[str]]]:
    """(module, names) for every import of gemma3_tune.* in the file, relative ones resolved."""
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name.startswith("gemma3_tune")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.startswith("gemma3_tune"):
                out.append((mod, [a.name for a in node.names]))
    return out


def resolve(mod: str, names: list[str], modules: set[str]) -> list[str]:
    """The modules an import reaches: `from pkg import sub` names a submodule where one exists."""
    subs = [f"{mod}.{n}" for n in names if f"{mod}.{n}" in modules]
    return subs or ([mod] if mod in modules else [])


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, n = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = n[0]
        n[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def script_cycles() -> list[list[str]]:
    """Import cycles among scripts/*.py (they import each other by file name)."""
    files = {f.stem: f for f in (ROOT / "scripts").glob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, f in files.items():
        for node in ast.walk(ast.parse(f.read_text())):
            mods = []
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                mods = [node.module]
            graph.setdefault(name, set()).update(m for m in mods if m in files and m != name)
    return cycles(graph)


def shape() -> dict:
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(f) for f in files}
    graph: dict[str, set[str]] = {}
    functions, sizes, model_imports, trainer_names = [], [], set(), set()
    for f in files:
        source = f.read_text()
        tree = ast.parse(source)
        name = module_name(f)
        sizes.append((len(source.splitlines()), name))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions.append((node.end_lineno - node.lineno + 1, f"{name}.{node.name}"))
        for mod, names in our_imports(f, tree):
            targets = resolve(mod, names, modules)
            graph.setdefault(name, set()).update(t for t in targets if t != name)
            if name.startswith("gemma3_tune.model"):
                model_imports.update(
                    t
                    for t in targets
                    if not t.startswith("gemma3_tune.model") and t != "gemma3_tune.errors"
                )
            if name == "gemma3_tune.train.trainer":
                trainer_names.update(f"{mod}.{n}" for n in names or [mod])
    functions.sort(reverse=True)
    sizes.sort(reverse=True)
    return {
        "longest_functions": functions[:5],
        "largest_modules": sizes[:5],
        "import_cycles": cycles(graph) + script_cycles(),
        "model_imports_of_ours": sorted(model_imports),
        "trainer_imported_names": len(trainer_names),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--json", action="store_true")
    s = shape()
    if p.parse_args().json:
        print(json.dumps(s))
        return
    print("longest functions (lines; goal <= 80):")
    for n, f in s["longest_functions"]:
        print(f"  {n:5d}  {f}")
    print("largest modules (lines; goal <= 450):")
    for n, m in s["largest_modules"]:
        print(f"  {n:5d}  {m}")
    print(f"import cycles (goal 0): {len(s['import_cycles'])}")
    for c in s["import_cycles"]:
        print("  " + " <-> ".join(c))
    print(
        f"model/ imports of our other packages, errors.py aside (goal 0): {len(s['model_imports_of_ours'])}"
    )
    for m in s["model_imports_of_ours"]:
        print(f"  {m}")
    print(f"names train/trainer.py imports from us (goal < 25): {s['trainer_imported_names']}")


if __name__ == "__main__":
    main()
