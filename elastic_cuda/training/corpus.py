"""Offline text sources for the router training data (no download, nothing outside the Python install).

Sources (each document has a stable name; see `TextCorpus.manifest()`):
  * ``stdlib-code:<relpath>``       Python source files of the installed standard library
                                     (``sysconfig.get_paths()["stdlib"]``), tests, encodings tables,
                                     demos and site-packages excluded; used as code filler/continuations.
  * ``stdlib-docstrings:<relpath>``  the module/class/function docstrings of the same files, joined
                                     (parsed with ``ast``; nothing is imported); used as prose.
  * ``pydoc-topics:<topic>``         the language-reference topic texts shipped with the stdlib in
                                     ``pydoc_data/topics.py`` (read as data with ``ast``, not imported); prose.
  * ``package-license:<dist>/<file>`` license texts shipped by installed distributions
                                     (``site-packages/*.dist-info/LICENSE*``, ``.../licenses/**``); prose.

Determinism: documents are listed by sorted name and picked with a seeded ``random.Random``. The train/eval
split is decided per document by a hash of its name (``split_of``), never by its position in the list, so a
file present on two machines lands in the same split on both. The lists themselves differ between Python
versions (3.11 here, 3.12 on the GPU machine) and between sets of installed packages, so the same seed can draw
different texts on different machines; a run on one machine is exactly reproducible.
"""
from __future__ import annotations

import ast
import functools
import glob
import hashlib
import os
import sysconfig

_EXCLUDED_PARTS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "encodings",
                   "turtledemo", "ensurepip", "lib2to3", "pydoc_data"}
_MIN_FILE_BYTES, _MAX_FILE_BYTES = 2_000, 250_000


def split_of(name: str, eval_fraction: float) -> str:
    """'eval' for a fixed hash-chosen fraction of document names, else 'train' (machine independent)."""
    bucket = int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:4], "big") % 10_000
    return "eval" if bucket < eval_fraction * 10_000 else "train"


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (UnicodeDecodeError, OSError):
        return ""


def _docstrings_of(source: str) -> str:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return ""
    parts = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) > 40:
                parts.append(doc.strip())
    return "\n\n".join(parts)


def _pydoc_topics(stdlib: str) -> dict[str, str]:
    path = os.path.join(stdlib, "pydoc_data", "topics.py")
    source = _read_text(path)
    if not source:
        return {}
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return {}
    for node in tree.body:  # `topics = {...}` is a literal dict: evaluate it without importing
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "topics" for t in node.targets):
            try:
                value = ast.literal_eval(node.value)
            except ValueError:
                return {}
            return {k: v for k, v in value.items() if isinstance(v, str)}
    return {}


class TextCorpus:
    """Lists the offline documents of one split and serves their text (cached)."""

    def __init__(self, split: str = "train", eval_fraction: float = 0.2, stdlib_dir: str | None = None,
                 site_dirs: list[str] | None = None):
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        if not 0.0 < eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
        self.split, self.eval_fraction = split, eval_fraction
        self.stdlib_dir = stdlib_dir or sysconfig.get_paths()["stdlib"]
        paths = sysconfig.get_paths()
        self.site_dirs = site_dirs if site_dirs is not None else sorted({paths["purelib"], paths["platlib"]})
        self._paths: dict[str, str] = {}
        self._topics = _pydoc_topics(self.stdlib_dir)
        code, docstrings, prose = [], [], []
        for path in sorted(glob.glob(os.path.join(self.stdlib_dir, "**", "*.py"), recursive=True)):
            rel = os.path.relpath(path, self.stdlib_dir).replace(os.sep, "/")
            if set(rel.split("/")[:-1]) & _EXCLUDED_PARTS or rel.startswith("config-"):
                continue
            try:
                size = os.path.getsize(path)
            except OSError:
                continue
            if not _MIN_FILE_BYTES <= size <= _MAX_FILE_BYTES:
                continue
            self._paths["stdlib-code:" + rel] = path
            self._paths["stdlib-docstrings:" + rel] = path
            code.append("stdlib-code:" + rel)
            docstrings.append("stdlib-docstrings:" + rel)
        prose += ["pydoc-topics:" + k for k in sorted(self._topics) if len(self._topics[k]) > 500]
        for site in self.site_dirs:
            patterns = ("*.dist-info/LICENSE*", "*.dist-info/LICENCE*", "*.dist-info/COPYING*",
                        "*.dist-info/licenses/**/*")
            for pattern in patterns:
                for path in sorted(glob.glob(os.path.join(site, pattern), recursive=True)):
                    if not os.path.isfile(path) or os.path.getsize(path) < 500:
                        continue
                    dist_dir = os.path.relpath(path, site).split(os.sep)[0]
                    dist = dist_dir[: -len(".dist-info")].rsplit("-", 1)[0].lower()  # drop the version
                    inner = os.path.relpath(path, os.path.join(site, dist_dir)).replace(os.sep, "/")
                    name = f"package-license:{dist}/{inner}"
                    if name not in self._paths:
                        self._paths[name] = path
                        prose.append(name)
        keep = lambda names: sorted(n for n in names if split_of(n, eval_fraction) == split)  # noqa: E731
        self.code_docs = keep(code)
        self.docstring_docs = keep(docstrings)
        self.prose_docs = sorted(set(keep(prose)))
        if not self.code_docs or not (self.prose_docs or self.docstring_docs):
            raise ValueError(f"no offline text found under stdlib_dir={self.stdlib_dir!r} "
                             f"and site_dirs={self.site_dirs!r} for split {split!r}")

    @functools.lru_cache(maxsize=256)  # noqa: B019 - one corpus per process, bounded cache
    def text(self, name: str) -> str:
        source, _, key = name.partition(":")
        if source == "pydoc-topics":
            return self._topics.get(key, "")
        raw = _read_text(self._paths[name]).replace("\r\n", "\n").replace("\t", "    ")
        if source == "stdlib-docstrings":
            return _docstrings_of(raw)
        return raw

    def prose_names(self) -> list[str]:
        """Prose documents: pydoc topics, license texts and stdlib docstrings."""
        return self.prose_docs + self.docstring_docs

    def manifest(self) -> dict:
        count = lambda prefix, names: sum(n.startswith(prefix) for n in names)  # noqa: E731
        prose = self.prose_names()
        return {
            "split": self.split,
            "eval_fraction": self.eval_fraction,
            "stdlib_dir": self.stdlib_dir,
            "site_dirs": list(self.site_dirs),
            "counts": {
                "stdlib-code": len(self.code_docs),
                "stdlib-docstrings": count("stdlib-docstrings:", prose),
                "pydoc-topics": count("pydoc-topics:", prose),
                "package-license": count("package-license:", prose),
            },
            "documents": {"code": list(self.code_docs), "prose": prose},
        }
