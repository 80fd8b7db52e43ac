"""One CUDA stack, checked from the files (no GPU needed): constraints.txt declares a CUDA major, and torch's CUDA
libraries, the gpu extra's FAISS and its libraries, and the Dockerfile's base all agree with it."""
import re
import tomllib

import pytest

from conftest import REPO

# Packages whose major version is the CUDA major (the others, e.g. nvidia-cufft 12.x under CUDA 13, version
# themselves); and packages named for a CUDA major (``-cu13``, ``cupy-cuda13x``).
VERSIONED_AS_CUDA = {"cuda-toolkit", "cuda-bindings", "nvidia-cuda-runtime", "nvidia-cuda-nvrtc", "nvidia-cuda-cupti",
                     "nvidia-cublas", "nvidia-nvjitlink", "nvidia-nvtx"}
NAMED_FOR_CUDA = re.compile(r"-cu(?:da)?(\d+)x?$")


def declared_major(text: str) -> int:
    found = re.search(r"^# One CUDA stack: CUDA (\d+)\.", text, re.M)
    assert found, "constraints.txt must say which CUDA major it pins (# One CUDA stack: CUDA N.)"
    return int(found.group(1))


def pins(text: str) -> dict[str, str]:
    return {name.lower(): version for name, version in re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+)", text, re.M)}


def cuda_majors(pinned: dict[str, str]) -> dict[str, int]:
    """The CUDA major each pinned package is built for, where its name or version says it."""
    majors = {}
    for name, version in pinned.items():
        named = NAMED_FOR_CUDA.search(name)
        if named:
            majors[name] = int(named.group(1))
        elif name in VERSIONED_AS_CUDA:
            majors[name] = int(version.split(".")[0])
    return majors


def stack_problems(constraints: str, pyproject: dict, dockerfile: str) -> list[str]:
    major = declared_major(constraints)
    pinned = pins(constraints)
    problems = [f"{name}=={pinned[name]} is CUDA {m}" for name, m in cuda_majors(pinned).items() if m != major]
    gpu_extra = [re.split(r"[<>=!~\[ ;]", req, maxsplit=1)[0].lower()
                 for req in pyproject["project"]["optional-dependencies"]["gpu"]]
    for name in gpu_extra:
        if name not in pinned:
            problems.append(f"the gpu extra's {name} is not pinned in constraints.txt")
        elif name.startswith("faiss") and pinned[name] != pinned.get("faiss-cpu"):
            problems.append(f"{name}=={pinned[name]} is not the faiss-cpu version ({pinned.get('faiss-cpu')}): "
                            "the two flavours must be the same FAISS")
    for base in re.findall(r"^(?:ARG BASE=|FROM )(\S+)", dockerfile, re.M):
        cuda_base = re.match(r"(?:.*/)?nvidia/cuda:(\d+)", base)
        if cuda_base and int(cuda_base.group(1)) != major:
            problems.append(f"the Dockerfile's base {base} is CUDA {cuda_base.group(1)}")
    return problems


def read_files():
    return ((REPO / "constraints.txt").read_text(), tomllib.loads((REPO / "pyproject.toml").read_text()),
            (REPO / "Dockerfile").read_text())


def test_one_cuda_stack_in_the_files():
    constraints, pyproject, dockerfile = read_files()
    assert stack_problems(constraints, pyproject, dockerfile) == []
    majors = cuda_majors(pins(constraints))
    assert {"cuda-toolkit", "nvidia-cublas", "nvidia-nccl-cu13", "libcuvs-cu13"} <= set(majors)   # both sides seen
    assert "nvidia/cuda" not in dockerfile.split("FROM", 1)[1]       # no second stack from a CUDA base image


def test_installed_torch_is_the_declared_cuda():
    """CI installs the pinned torch from PyPI (the CUDA build; it runs on CPUs): its CUDA is the declared one."""
    torch = pytest.importorskip("torch")
    constraints = (REPO / "constraints.txt").read_text()
    assert torch.__version__.split("+")[0] == pins(constraints)["torch"]
    assert torch.version.cuda is not None and int(torch.version.cuda.split(".")[0]) == declared_major(constraints)


@pytest.mark.parametrize("change, expected", [
    (("faiss-gpu-cuvs==1.15.1", "faiss-gpu-cu12==1.15.1"), "faiss-gpu-cu12==1.15.1 is CUDA 12"),
    (("cuda-toolkit==13.2.2", "cuda-toolkit==12.9.1"), "cuda-toolkit==12.9.1 is CUDA 12"),
    (("faiss-gpu-cuvs==1.15.1", "faiss-gpu-cuvs==1.14.0"), "is not the faiss-cpu version"),
    (("faiss-gpu-cuvs==1.15.1\n", ""), "the gpu extra's faiss-gpu-cuvs is not pinned"),
    (("ARG BASE=debian:bookworm-slim", "ARG BASE=nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04"),
     "base nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04 is CUDA 12"),
])
def test_a_split_stack_is_named(change, expected):
    constraints, pyproject, dockerfile = read_files()
    old, new = change
    assert old in constraints + dockerfile
    problems = stack_problems(constraints.replace(old, new), pyproject, dockerfile.replace(old, new))
    assert any(expected in p for p in problems), problems
