import itertools
import json

import pytest
import torch

from mtc.data import load_documents, offline_documents, pack_contexts, special_token_ids
from mtc.testing import tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def test_packing_starts_every_context_with_bos_and_keeps_every_token(tokenizer):
    docs = ["alpha beta gamma " * 5, "the quick brown fox", "def f(x): return x"] * 3
    contexts = list(pack_contexts(docs, tokenizer, seq_len=12))
    assert all(c.shape == (12,) and c.dtype == torch.long for c in contexts)
    assert all(int(c[0]) == tokenizer.bos_token_id for c in contexts)
    assert all((c[1:] != tokenizer.bos_token_id).all() for c in contexts)
    stream = []
    for d in docs:
        stream += tokenizer(d, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    packed = torch.cat([c[1:] for c in contexts]).tolist()
    assert packed == stream[: len(packed)] and len(stream) - len(packed) < 11


def test_offline_corpus_is_deterministic_and_substantial():
    first = list(itertools.islice(offline_documents(), 50))
    assert first == list(itertools.islice(offline_documents(), 50))
    assert sum(map(len, first)) > 10_000


def test_local_text_and_jsonl_files(tmp_path, tokenizer):
    (tmp_path / "a.txt").write_text("first paragraph here\n\nsecond paragraph there\n")
    assert list(load_documents(str(tmp_path / "a.txt"))) == ["first paragraph here", "second paragraph there\n"]
    rows = [{"content": "one doc"}, {"content": "another doc"}]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert list(load_documents(str(tmp_path / "b.jsonl"), text_column="content")) == ["one doc", "another doc"]
    with pytest.raises(KeyError, match="no column 'text'"):
        list(load_documents(str(tmp_path / "b.jsonl")))


def test_missing_empty_and_unsupported_files_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_documents(str(tmp_path / "nope.jsonl"))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty"):
        load_documents(str(tmp_path / "empty.txt"))
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported suffix"):
        load_documents(str(tmp_path / "data.csv"))
    (tmp_path / "folder").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no"):
        load_documents(str(tmp_path / "folder"))


def test_tokenizer_without_bos_uses_eos(tokenizer):
    class NoBos:
        bos_token_id, eos_token_id = None, 7
    assert special_token_ids(NoBos()) == (7, 7)
    assert special_token_ids(tokenizer) == (tokenizer.bos_token_id, tokenizer.eos_token_id)


def test_held_out_documents_never_reach_the_training_stream():
    from mtc.data import split_documents

    docs = list(itertools.islice(offline_documents(), 2000))
    train, held_out = list(split_documents(docs, "train")), list(split_documents(docs, "eval"))
    assert len(train) + len(held_out) == len(docs)
    assert not set(train) & set(held_out)
    assert 0.02 < len(held_out) / len(docs) < 0.09  # about one in 20
    assert list(split_documents(docs, "eval")) == held_out  # stable
