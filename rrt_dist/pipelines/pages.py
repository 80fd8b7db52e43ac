"""The pages this package ships (the search page, the results browser) share one stylesheet, ``style.css``."""
from __future__ import annotations

from importlib.resources import files

STYLESHEET_LINK = '<link rel="stylesheet" href="style.css">'


def asset_text(name: str) -> str:
    return files("rrt_dist.pipelines").joinpath(name).read_text()


def page_text(name: str) -> str:
    """Page ``name`` with the shared stylesheet inlined in place of its link: one file is the whole page (served
    at ``/``, or written beside search results)."""
    return asset_text(name).replace(STYLESHEET_LINK, f"<style>\n{asset_text('style.css')}</style>", 1)
