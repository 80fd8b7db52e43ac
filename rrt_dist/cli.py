"""``rrt-dist <job> [hydra overrides...]``: runs the job module ``rrt_dist.jobs.<job>`` (``jobs/<job>.py`` in the
checkout: the same file ``ray job submit`` runs)."""
from __future__ import annotations

import runpy
import sys
from importlib.resources import files
from pathlib import Path


def jobs_dir() -> Path:
    return Path(str(files("rrt_dist.jobs")))


def available_jobs() -> list[str]:
    return sorted(p.stem for p in jobs_dir().glob("*.py") if not p.stem.startswith("_"))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    jobs = available_jobs()
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: rrt-dist <job> [key=value ...] [--cfg job] [--help]\n\njobs: " + ", ".join(jobs))
        raise SystemExit(0 if argv else 2)
    job, overrides = argv[0], argv[1:]
    if job not in jobs:
        print(f"rrt-dist: unknown job {job!r}; available: {', '.join(jobs)}", file=sys.stderr)
        raise SystemExit(2)
    sys.argv = [str(jobs_dir() / f"{job}.py"), *overrides]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
