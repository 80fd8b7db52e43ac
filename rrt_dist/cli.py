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


def restore_table_command(args: list[str]) -> None:
    """``rrt-dist restore-table TABLE``: a feature table whose newest version cannot be read goes back to its last
    readable version (the unreadable manifests are kept, renamed)."""
    from rrt_dist.schema import UnreadableTable
    from rrt_dist.store.features import restore_table

    if len(args) != 1 or args[0].startswith("-"):
        print("usage: rrt-dist restore-table TABLE   (a .lance folder or URI)", file=sys.stderr)
        raise SystemExit(2)
    try:
        print(restore_table(args[0]))
    except UnreadableTable as err:
        print(f"rrt-dist: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    jobs = available_jobs()
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: rrt-dist <job> [key=value ...] [--cfg job] [--help]\n       rrt-dist restore-table TABLE\n\n"
              "jobs: " + ", ".join(jobs))
        raise SystemExit(0 if argv else 2)
    job, overrides = argv[0], argv[1:]
    if job == "restore-table":
        restore_table_command(overrides)
        return
    if job not in jobs:
        print(f"rrt-dist: unknown job {job!r}; available: {', '.join(jobs)}", file=sys.stderr)
        raise SystemExit(2)
    sys.argv = [str(jobs_dir() / f"{job}.py"), *overrides]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
