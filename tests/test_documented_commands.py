"""Every command in the fenced shell blocks of README.md and docs/ works as written: an ``rrt-dist <job> …`` (or
``python jobs/<job>.py …``, also after ``ray job submit … --``) composes and passes the project's validation,
a ``benchmarks/<name>.py`` flag is one its parser declares, a ``make`` target exists. Paths such as
``/data/...`` may be missing (nothing is run); unknown keys, values and flags may not."""
import ast
import functools
import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHELL_FENCES = {"bash", "sh", "shell", "console"}
MENTIONS = ("rrt-dist", "jobs/", "benchmarks/", "make")


def documented_pages() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def shell_commands(markdown: str) -> list[str]:
    """The command lines (continuations joined, ``$`` prompts dropped) of the shell-fenced blocks that mention
    something this project runs."""
    commands = []
    for lang, body in re.findall(r"^ *```(\w*)[^\n]*\n(.*?)^ *```", markdown, re.S | re.M):
        if lang not in SHELL_FENCES:
            continue
        for line in re.sub(r"\\\n", " ", body).splitlines():
            line = re.sub(r"^\s*\$ ", "", line).strip()
            if line and not line.startswith("#") and any(m in line for m in MENTIONS):
                commands.append(line)
    return commands


@functools.lru_cache(maxsize=None)
def _argparse_flags(script: Path) -> set[str]:
    """The option strings of every ``add_argument`` call in a benchmark script (read, not run)."""
    flags = set()
    for node in ast.walk(ast.parse(script.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            flags |= {a.value for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("-")}
    return flags | {"-h", "--help"}


@functools.lru_cache(maxsize=None)
def _make_targets() -> set[str]:
    return set(re.findall(r"^([\w.-]+)\s*:(?!=)", (REPO / "Makefile").read_text(), re.M))


def _job_problem(job: str, args: list[str]) -> str | None:
    from hydra import compose, initialize_config_dir

    from rrt_dist.cli import available_jobs
    from rrt_dist.config import CONFIG_DIR, validate_config
    from rrt_dist.runtime import composition_error
    from rrt_dist.schema import USER_ERRORS

    if job == "restore-table":
        return None if len(args) == 1 else "restore-table takes one TABLE"
    if job == "browse":
        from rrt_dist.cli import browse_arguments

        try:
            browse_arguments(args)
        except SystemExit:
            return "rrt-dist browse takes RUN [RUN2] [--port N]"
        return None
    if job not in available_jobs():
        return f"no job {job!r}"
    overrides, i = [], 0
    while i < len(args):
        if args[i] == "--cfg":                 # --cfg job|hydra|all: print the composed config
            if i + 1 >= len(args) or args[i + 1] not in ("job", "hydra", "all"):
                return "--cfg takes job, hydra or all"
            i += 2
            continue
        if args[i] in ("--help", "-h", "--info"):
            i += 1
            continue
        if args[i].startswith("-"):
            return f"unknown flag {args[i]}"
        overrides.append(args[i])
        i += 1
    problem = composition_error(overrides)
    if problem:
        return problem
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[*overrides, "output_dir=unused"])
    try:
        validate_config(cfg)
    except USER_ERRORS as err:
        return str(err)
    return None


def command_problem(command: str) -> str | None:
    """Why ``command`` would fail as written (None: it would compose / parse)."""
    try:
        lexer = shlex.shlex(command, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        tokens = list(lexer)
    except ValueError as err:
        return f"not a shell command: {err}"
    segments, current = [], []
    for token in tokens:
        if token in (";", "&&", "||", "|", "&"):
            segments.append(current)
            current = []
        else:
            current.append(token)
    segments.append(current)
    for words in segments:
        while words and re.match(r"^[A-Za-z_]\w*=", words[0]):          # VAR=value before the command
            words = words[1:]
        if words[:3] == ["ray", "job", "submit"]:
            words = words[words.index("--") + 1:] if "--" in words else []
        if not words:
            continue
        program = Path(words[0]).name
        problem = None
        if program == "rrt-dist":
            problem = _job_problem(words[1], words[2:]) if len(words) > 1 and words[1] not in ("-h", "--help") \
                else None
        elif program.startswith("python") and len(words) > 1 and words[1].startswith("jobs/"):
            problem = _job_problem(Path(words[1]).stem, words[2:]) if (REPO / words[1]).exists() \
                else f"no {words[1]}"
        elif program.startswith("python") and len(words) > 1 and words[1].startswith("benchmarks/"):
            script = REPO / words[1]
            if not script.exists():
                problem = f"no {words[1]}"
            else:
                unknown = [w.split("=", 1)[0] for w in words[2:] if w.startswith("-")
                           and w.split("=", 1)[0] not in _argparse_flags(script)]
                problem = f"{words[1]} has no {', '.join(unknown)}" if unknown else None
        elif program == "make":
            missing = [w for w in words[1:] if "=" not in w and not w.startswith("-") and w not in _make_targets()]
            problem = f"no make target {', '.join(missing)}" if missing else None
        if problem:
            return problem
    return None


def test_every_documented_command_works_as_written():
    problems = [f"{page.relative_to(REPO)}: {command}\n    -> {problem}"
                for page in documented_pages() for command in shell_commands(page.read_text())
                if (problem := command_problem(command))]
    assert not problems, "\n".join(problems)
    assert len(shell_commands((REPO / "README.md").read_text())) >= 10       # the check sees the README's commands


@pytest.mark.parametrize("command, reason", [
    ("rrt-dist evaluate index.factory=IVF4096,PQ64", "Ambiguous"),              # needs quoting
    ("rrt-dist evaluate index.neighbours=0", "index.neighbours"),
    ("rrt-dist evaluate reranker.methods=[rrt,nosuch]", "nosuch"),
    ("rrt-dist evaluate dataset=roxford dataset.root=/data/roxford5k", "no such dataset preset"),
    ("rrt-dist evaluate datset.root=/data/x", "datset"),
    ("rrt-dist nosuchjob", "no job"),
    ("rrt-dist browse A B C", "rrt-dist browse takes RUN [RUN2]"),
    (".venv/bin/python jobs/evaluate.py --cfg jobs", "--cfg"),
    ("ray job submit --address http://h:8265 -- python jobs/ingest.py gallery.nme=shop", "nme"),
    ("python benchmarks/scale.py --quick", "--quick"),
    ("make demo && make nosuch", "nosuch"),
])
def test_a_command_that_would_fail_is_reported(command, reason):
    problem = command_problem(command)
    assert problem and reason in problem, problem


def test_fenced_blocks_are_read_with_continuations_and_quoting():
    text = ("intro\n```bash\n$ rrt-dist evaluate 'index.factory=\"IVF4096,PQ64\"' \\\n    index.neighbours=10   # quoted\n"
            "export X=1\n```\n```\nrrt-dist evaluate index.k=0\n```\n")
    assert shell_commands(text) == ["rrt-dist evaluate 'index.factory=\"IVF4096,PQ64\"'      index.neighbours=10   # quoted"]
    assert command_problem(shell_commands(text)[0]) is None


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.+)$", re.sub(r"^ *```.*?^ *```", "", markdown, flags=re.S | re.M), re.M)}


def test_links_between_pages_resolve():
    broken = []
    for page in documented_pages():
        text = page.read_text()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"^[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists() or not linked.resolve().is_relative_to(REPO):
                broken.append(f"{page.relative_to(REPO)}: {target}")
            elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked.read_text()):
                broken.append(f"{page.relative_to(REPO)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)
