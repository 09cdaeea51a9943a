"""The offline demo corpus: docstrings of the Python standard library, read from source with `ast`.

Every Python install has it, so the main job (`gpt2-flax train` with no arguments) needs no download.
The sources are parsed, never imported (importing `antigravity` opens a browser, `this` prints).
"""

from __future__ import annotations

import ast
import os
import sysconfig
from pathlib import Path


def _docstrings(source: str) -> list[str]:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):  # a few test files are deliberately broken
        return []
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    docs = [ast.get_docstring(node) for node in ast.walk(tree) if isinstance(node, kinds)]
    return [d.strip() for d in docs if d and len(d.strip()) > 40]


def stdlib_docstrings(max_bytes: int = 4_000_000) -> str:
    """Up to `max_bytes` of standard-library docstrings, in a fixed order, separated by blank lines."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts: list[str] = []
    size = 0
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if "site-packages" in rel or "test" in rel or "tests" in rel or "idlelib" in rel:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        for doc in _docstrings(text):
            parts.append(doc)
            size += len(doc.encode()) + 2
            if size >= max_bytes:
                return "\n\n".join(parts) + "\n"
    if not parts:
        raise RuntimeError(f"found no docstrings under {root}; pass your own text with --data.files=...")
    return "\n\n".join(parts) + "\n"


def local_cache_dir() -> Path:
    """`$GPT2_FLAX_HOME` if set, else ~/.cache/gpt2_flax: local files a run may rebuild."""
    env = os.environ.get("GPT2_FLAX_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gpt2_flax"


def write_demo_corpus(path: str | Path, max_bytes: int = 4_000_000) -> Path:
    path = Path(path)
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(stdlib_docstrings(max_bytes), encoding="utf-8")
        tmp.replace(path)
    return path
