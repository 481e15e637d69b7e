"""Text corpora and packing them into fixed-length token contexts.

A corpus is an iterable of documents (strings): Python's own bundled documentation ("pydoc", works
offline), local text/JSONL/parquet files, or a Hugging Face dataset streamed by name. `pack_contexts`
tokenises documents and packs them into contexts of `seq_len` tokens that each start with BOS.
"""

from __future__ import annotations

import ast
import itertools
import sysconfig
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

OFFLINE_CORPUS = "pydoc"
LOCAL_SUFFIXES = {".txt": "text", ".md": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def offline_documents() -> Iterator[str]:
    """Python's bundled documentation: the `pydoc_data` topics, then every module, class and function
    docstring of the standard library (read with `ast`, never imported). Deterministic order."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield topics[name]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.rglob("*.py")):
        if any(part in {"test", "tests", "idlelib", "site-packages", "lib2to3"} for part in path.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 80:
                    yield doc


def _local_files(path: Path) -> tuple[str, list[str]]:
    """The `datasets` builder name and file list for a local file or folder."""
    files = sorted(p for p in path.rglob("*") if p.suffix in LOCAL_SUFFIXES) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"dataset folder {path} holds no {'/'.join(LOCAL_SUFFIXES)} files")
    builders = {LOCAL_SUFFIXES.get(p.suffix) for p in files}
    if None in builders:
        raise ValueError(f"dataset file {path} has an unsupported suffix; use one of {', '.join(LOCAL_SUFFIXES)}")
    if len(builders) > 1:
        raise ValueError(f"dataset folder {path} mixes file types {sorted(builders)}; keep one kind per folder")
    empty = [str(p) for p in files if p.stat().st_size == 0]
    if empty:
        raise ValueError(f"dataset file(s) {empty} are empty; remove them or point to files with text")
    return builders.pop(), [str(p) for p in files]


def load_documents(dataset: str, split: str = "train", text_column: str = "text") -> Iterable[str]:
    """Documents of `dataset`: "pydoc" (offline), a local file or folder, or a Hugging Face id
    (streamed, so nothing is downloaded in full)."""
    if dataset == OFFLINE_CORPUS:
        return offline_documents()
    import datasets

    path = Path(dataset).expanduser()
    if path.exists():
        builder, files = _local_files(path)
        kwargs = {"sample_by": "paragraph"} if builder == "text" else {}
        ds = datasets.load_dataset(builder, data_files=files, split="train", streaming=True, **kwargs)
    elif dataset.startswith((".", "/", "~")) or Path(dataset).suffix in LOCAL_SUFFIXES:
        raise FileNotFoundError(f"dataset file {dataset} does not exist; check the path "
                                f"(or use dataset='{OFFLINE_CORPUS}' for the offline corpus)")
    else:
        try:
            ds = datasets.load_dataset(dataset, split=split, streaming=True)
        except Exception as err:  # datasets raises many types for offline / unknown / gated datasets
            raise RuntimeError(f"could not open Hugging Face dataset {dataset!r} (split {split!r}): {err}. "
                               f"Without internet use dataset='{OFFLINE_CORPUS}' or a local file.") from err
    return _text_column(ds, text_column, dataset)


def _text_column(ds: Iterable[dict], column: str, name: str) -> Iterator[str]:
    for row in ds:
        if column not in row:
            raise KeyError(f"dataset {name} has no column {column!r} (columns: {sorted(row)}); "
                           f"set text_column to the one holding the text")
        if row[column]:
            yield row[column]


HOLDOUT_EVERY = 20  # one document in 20 is held out for evaluation


def is_held_out(document: str) -> bool:
    """Whether a document belongs to the evaluation split: a stable hash of its text, so the split is the
    same on every machine and for every pass over a (streamed) corpus."""
    return zlib.crc32(document.encode("utf-8", "replace")) % HOLDOUT_EVERY == 0


def split_documents(documents: Iterable[str], role: str) -> Iterator[str]:
    """The training ("train") or held-out ("eval") documents of a corpus; the two never overlap."""
    if role not in ("train", "eval"):
        raise ValueError(f"role must be 'train' or 'eval', got {role!r}")
    want_held_out = role == "eval"
    return (doc for doc in documents if is_held_out(doc) == want_held_out)


def pack_contexts(documents: Iterable[str], tokenizer, seq_len: int, docs_per_call: int = 64) -> Iterator[torch.Tensor]:
    """Tokenise documents and pack them into `[seq_len]` contexts: BOS, then `seq_len - 1` tokens of the
    concatenated stream (documents separated by EOS). The last partial context is dropped."""
    bos, eos = special_token_ids(tokenizer)
    body = seq_len - 1
    pending: list[int] = []
    docs = iter(documents)
    while chunk := list(itertools.islice(docs, docs_per_call)):
        for ids in tokenizer(chunk, add_special_tokens=False)["input_ids"]:
            pending.extend(ids)
            pending.append(eos)
        n_full = len(pending) // body
        if n_full:
            block = torch.tensor(pending[: n_full * body], dtype=torch.long).view(n_full, body)
            del pending[: n_full * body]
            yield from torch.cat([torch.full((n_full, 1), bos), block], dim=1)


def special_token_ids(tokenizer) -> tuple[int, int]:
    """(BOS, EOS) ids; a tokenizer without BOS (e.g. GPT-2 style) uses EOS as both."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else bos
    if bos is None:
        raise ValueError("the tokenizer has neither a BOS nor an EOS token; set tokenizer.bos_token first")
    return bos, eos
