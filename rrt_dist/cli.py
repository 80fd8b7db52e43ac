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
    """``rrt-dist restore-table TABLE``: a table whose newest version cannot be read, or lacks data files, goes back
    to what can be recovered (``rrt_dist.store.restore``; nothing is deleted), and the line says what to rerun."""
    from rrt_dist.schema import UnreadableTable
    from rrt_dist.store import restore

    if len(args) != 1 or args[0].startswith("-"):
        print("usage: rrt-dist restore-table TABLE   (a .lance folder or URI)", file=sys.stderr)
        raise SystemExit(2)
    try:
        done = restore(args[0])
    except UnreadableTable as err:
        print(f"rrt-dist: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(done.message)
    gallery = gallery_of(args[0])
    if gallery is not None and done.changed:
        root, name = gallery
        print(f"{name} is a gallery: `rrt-dist ingest gallery.name={name} gallery.root={root}` (no images) extracts "
              f"again the rows its catalog lists and the table lacks, and commits a new snapshot")


def gallery_of(table: str) -> tuple[str, str] | None:
    """``(root, name)`` of the gallery whose feature table ``table`` is (``<root>/<name>/features/<fingerprint>/
    gallery.lance``, with the gallery's record), or None."""
    import fsspec

    from rrt_dist.gallery.core import RECORD

    parts = table.rstrip("/").rsplit("/", 4)
    if len(parts) != 5 or parts[2] != "features" or parts[4] != "gallery.lance":
        return None
    fs, path = fsspec.core.url_to_fs(f"{parts[0]}/{parts[1]}/{RECORD}")
    return (parts[0], parts[1]) if fs.exists(path) else None


def browse_arguments(args: list[str]):
    """``rrt-dist browse``'s arguments (argparse: a bad one exits with its usage)."""
    import argparse

    parser = argparse.ArgumentParser(prog="rrt-dist browse", description="Serve an evaluation's results browser "
                                     "(two runs of one benchmark: side by side) on 127.0.0.1.")
    parser.add_argument("runs", nargs="+", metavar="RUN", help="an evaluation's output folder (one or two)")
    parser.add_argument("--port", type=int, default=8765, help="port on 127.0.0.1 (0: any free one; default 8765)")
    options = parser.parse_args(args)
    if len(options.runs) > 2:
        parser.error("one run, or two to compare")
    return options


def browse_command(args: list[str]) -> None:
    """``rrt-dist browse RUN [RUN2] [--port N]``: serve an evaluation's results browser (two: side by side) on
    127.0.0.1 until interrupted."""
    from rrt_dist.schema import ConfigError

    options = browse_arguments(args)
    from rrt_dist.pipelines.browse import browse_server

    try:
        server = browse_server(options.runs, options.port)
    except (ConfigError, OSError) as err:
        print(f"rrt-dist: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"results browser: http://127.0.0.1:{server.server_address[1]}/  (Ctrl-C stops it)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    jobs = available_jobs()
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: rrt-dist <job> [key=value ...] [--cfg job] [--help]\n       rrt-dist restore-table TABLE\n"
              "       rrt-dist browse RUN [RUN2] [--port N]\n\n"
              "jobs: " + ", ".join(jobs))
        raise SystemExit(0 if argv else 2)
    job, overrides = argv[0], argv[1:]
    if job == "restore-table":
        restore_table_command(overrides)
        return
    if job == "browse":
        browse_command(overrides)
        return
    if job not in jobs:
        print(f"rrt-dist: unknown job {job!r}; available: {', '.join(jobs)}", file=sys.stderr)
        raise SystemExit(2)
    sys.argv = [str(jobs_dir() / f"{job}.py"), *overrides]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
