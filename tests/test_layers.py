"""The architecture as the imports show it: layers without a cycle, a config that loads no heavy library, and a
package that ships its jobs and configs."""
import ast
import functools
import subprocess
import sys
import tomllib
from pathlib import Path

import rrt_dist

REPO = Path(__file__).resolve().parent.parent
SOURCES = {"rrt_dist": REPO / "rrt_dist", "rrt_dist.jobs": REPO / "jobs"}
HEAVY = ("torch", "ray", "lance", "timm", "faiss")


def modules() -> dict[str, Path]:
    found = {}
    for package, root in SOURCES.items():
        for path in root.rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join((package, *parts))
            found[name.removesuffix(".__init__")] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every rrt_dist module ``name`` imports, at the top or deferred inside a function."""
    out = set()
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = name.split(".")[: len(name.split(".")) - node.level + is_package]
                base = ".".join([*parent, base] if base else parent)
            # `from package import module` imports that module; `from module import name`, that module
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target.startswith("rrt_dist") and target != name:
                out.add(target)
    return out


def layer_of(module: str) -> int:
    best, depth = None, -1
    for level, entries in enumerate(rrt_dist.LAYERS):
        for entry in entries:
            full = f"rrt_dist.{entry}"
            if (module == full or module.startswith(full + ".")) and full.count(".") > depth:
                best, depth = level, full.count(".")
    if module == "rrt_dist":
        return 0
    assert best is not None, f"{module} is in no layer of rrt_dist.LAYERS"
    return best


@functools.cache
def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(name, path, set(found)) for name, path in found.items()}


def test_no_module_imports_from_a_higher_layer():
    upward = [f"{m} (layer {layer_of(m)}) imports {t} (layer {layer_of(t)})"
              for m, targets in graph().items() for t in sorted(targets) if layer_of(t) > layer_of(m)]
    assert not upward, "\n".join(upward)


def test_the_import_graph_has_no_cycle():
    edges, state, cycles = graph(), {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def package_of(module: str) -> str:
    """The package a module belongs to: ``rrt_dist.eval.metrics`` -> ``eval``; top-level modules are their own."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def package_cycles(edges: dict[str, set[str]]) -> list[tuple[str, str]]:
    """Pairs of packages that import each other (through any of their modules, whatever layer each sits in)."""
    between = {(package_of(m), package_of(t)) for m, targets in edges.items() for t in targets
               if package_of(m) != package_of(t)}
    return sorted((a, b) for a, b in between if a < b and (b, a) in between)


def test_no_two_packages_import_each_other():
    assert not package_cycles(graph())


def test_the_package_check_sees_the_old_metrics_edge():
    """datasets.base importing eval.metrics while eval imports datasets: a cycle of packages, though each module
    sits below the one it imports."""
    edges = {"rrt_dist.datasets.base": {"rrt_dist.eval.metrics"}, "rrt_dist.eval.methods": {"rrt_dist.datasets"}}
    assert package_cycles(edges) == [("datasets", "eval")]


def test_the_metrics_keep_their_public_path():
    from rrt_dist import metrics
    from rrt_dist.eval import metrics as public

    assert all(getattr(public, name) is getattr(metrics, name) for name in metrics.__all__)
    assert public.revisitop is metrics.revisitop and callable(public.gldv2_map_at_k)


def test_the_layer_check_sees_an_upward_import(tmp_path):
    """The check itself: a core importing a pipeline is reported."""
    path = tmp_path / "core.py"
    path.write_text("def f():\n    from rrt_dist.pipelines.extract import extract_to_lance\n")
    found = imports("rrt_dist.index.core", path, set(modules()))
    assert found == {"rrt_dist.pipelines.extract"}
    assert layer_of("rrt_dist.pipelines.extract") > layer_of("rrt_dist.index.core")


def test_config_and_its_checks_load_no_heavy_library():
    code = ("import sys\nfrom hydra import compose, initialize_config_dir\n"
            "from rrt_dist.config import CONFIG_DIR, validate_config\n"
            "with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base='1.3'):\n"
            "    validate_config(compose(config_name='config', overrides=['experiment=demo']))\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    # FAISS parses index.factory: the one library the checks need
    assert out.stdout.split("\n")[-2] == "['faiss']"


def test_the_package_lists_every_package_and_ships_jobs_and_configs():
    settings = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "rrt_dist").rglob("__init__.py")}
    assert set(settings["packages"]) == on_disk | {"rrt_dist.jobs", "rrt_dist.configs"}
    assert settings["package-dir"] == {"rrt_dist.jobs": "jobs", "rrt_dist.configs": "configs"}
    from rrt_dist.cli import available_jobs
    from rrt_dist.config import CONFIG_DIR

    assert (CONFIG_DIR / "config.yaml").is_file()
    assert set(available_jobs()) == {p.stem for p in (REPO / "jobs").glob("*.py")} - {"__init__"}
