"""Durable file publishing: write into a temp path, fsync, rename into place. The one home of these
steps for checkpoints, run folders, final/ and exports, so a kill or a power loss never leaves a half
written folder under a real name."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """lmwright's cache folder: ``$LMWRIGHT_CACHE``, else ``$XDG_CACHE_HOME/lmwright``, else ``~/.cache/lmwright``
    (then ``parts`` below it): GGUF imports, the precision probe's figures."""
    root = os.environ.get("LMWRIGHT_CACHE")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = str(Path(xdg) / "lmwright") if xdg else str(Path.home() / ".cache" / "lmwright")
    return Path(root).joinpath(*parts)


def fsync_tree(root: Path) -> None:
    """fsync every file and folder under ``root`` (then ``root``): its data is on disk before a rename
    publishes it, so a power loss cannot leave a renamed folder with empty or short files."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fsync_path(Path(dirpath) / name)
        if Path(dirpath) != root:
            fsync_path(Path(dirpath))
    fsync_path(root)


def replace_dir(tmp: Path, dest: Path) -> None:
    """Publish the finished folder ``tmp`` as ``dest`` (fsynced, then renamed; an old ``dest`` is removed)."""
    fsync_tree(tmp)
    if dest.exists():
        old = dest.with_name(f".old-{dest.name}-{os.getpid()}")
        os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dest)
    fsync_path(dest.parent)


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder's entry list: a rename inside it is durable); best effort."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
