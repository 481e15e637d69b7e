"""A larger offline corpus for budgets beyond what `dataset="pydoc"` holds (about half a million Gemma
tokens): the docstrings of every package installed beside mtc, one JSON line per docstring, in a
deterministic order. `python -m mtc bench --quality --dataset DIR` reads the folder like any local dataset.

    python benchmarks/offline_corpus.py --out runs/corpus          # about 47M characters here
    python -m mtc bench --quality --dataset runs/corpus --total-tokens 2048000 --cache runs/quality/big.safetensors

What it holds depends on the installed packages, so caches built from it compare recipes with each other
on one machine, not across machines.
"""

from __future__ import annotations

import argparse
import ast
import json
import sysconfig
from pathlib import Path


def docstrings(root: Path, min_chars: int = 80):
    """Module, class and function docstrings longer than `min_chars` of every .py file under `root`."""
    for path in sorted(root.rglob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > min_chars:
                    yield doc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder to write corpus.jsonl into")
    parser.add_argument("--root", default=sysconfig.get_paths()["purelib"], help="where the packages are")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    n = chars = 0
    with open(out / "corpus.jsonl", "w") as f:
        for doc in docstrings(Path(args.root)):
            f.write(json.dumps({"text": doc}) + "\n")
            n, chars = n + 1, chars + len(doc)
    print(f"wrote {n:,} documents, {chars:,} characters to {out / 'corpus.jsonl'}")


if __name__ == "__main__":
    main()
