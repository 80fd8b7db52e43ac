"""What an install and the image carry: every third-party package the code imports is declared, and the image is
built as the cluster needs it (the probes' tools, the code installed read-only, no GPU exposed to every pod)."""
import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared() -> set[str]:
    """Distributions pyproject.toml asks for: the dependencies and every extra (faiss comes from one of two)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    return {canonical(re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0]) for r in requirements}


def imported_modules(root: Path) -> dict[str, str]:
    """Top-level module name -> a file importing it, over every import in the package and the jobs (deferred ones
    inside functions included), relative imports left out."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                found.setdefault(name.split(".")[0], str(path.relative_to(REPO)))
    return found


def test_every_imported_third_party_package_is_declared():
    distributions = packages_distributions()
    own = {"rrt_dist", "jobs", "configs"}
    undeclared = {}
    for root in (REPO / "rrt_dist", REPO / "jobs"):
        for module, where in imported_modules(root).items():
            if module in sys.stdlib_module_names or module in own:
                continue
            providers = {canonical(d) for d in distributions.get(module, [module])}
            if not providers & declared():
                undeclared[module] = (sorted(providers), where)
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"


def dockerfile_steps() -> list[str]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in (REPO / "Dockerfile").read_text().splitlines()
                                          if not line.lstrip().startswith("#")))
    return [line.strip() for line in text.splitlines() if line.strip()]


def test_the_image_has_what_kuberays_probes_run_and_keeps_the_code_read_only():
    """KubeRay (ray-operator/controllers/ray/common/pod.go, initLivenessAndReadinessProbe) execs
    ``bash -c "wget --tries 1 -T <s> -q -O- http://localhost:<port>/<path> | grep success"`` (utils/constant.go,
    BaseWgetHealthCommand) as the readiness probe of a RayService's worker pods, and as every probe of Ray before
    2.53: without wget a pod never becomes Ready. The code is installed as a package (not editable) by root, so the
    runtime user (uid 1000) can read and run it but not change it; the README, which only the package's metadata
    reads, is copied after the dependency layer (editing it keeps the 8 GB layer); no GPU is exposed to pods that
    did not ask for one (NVIDIA_VISIBLE_DEVICES comes from the device plugin, per pod)."""
    steps = dockerfile_steps()
    installs = " ".join(s for s in steps if s.startswith("RUN") and "apt-get install" in s)
    assert re.search(r"\bwget\b", installs), installs
    env = " ".join(s for s in steps if s.startswith(("ENV", "ARG")))
    assert "NVIDIA_VISIBLE_DEVICES" not in env
    pip_project = [s for s in steps if s.startswith("RUN") and re.search(r"pip install [^&]*--no-deps", s)]
    assert pip_project and not any(re.search(r"pip install [^&]*(-e|--editable)\b", s) for s in steps), pip_project
    assert not any(re.search(r"\b(chown|chmod)\b[^&]*/opt/rrt-dist", s) for s in steps)
    user = [i for i, s in enumerate(steps) if s.startswith("USER")]
    assert user and steps[user[-1]].split()[1] not in ("0", "root") and user[-1] > steps.index(pip_project[-1])
    deps = next(i for i, s in enumerate(steps) if "-r /tmp/requirements.txt" in s)
    readme = next(i for i, s in enumerate(steps) if s.startswith("COPY") and "README.md" in s)
    assert readme > deps
