"""Byte tokenizer and corpora."""

from __future__ import annotations

from pydoc_data.topics import topics

import pytest

from recurra.tasks.byte_tokenizer import ByteTokenizer
from recurra.tasks.corpus import load_corpus


def test_byte_tokenizer_round_trip_and_replacement():
    tok = ByteTokenizer()
    text = "héllo wörld — λ 😀"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.vocab_size == 256 and all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text
    assert tok.encode(b"\x00\xff") == [0, 255]
    # a cut multi-byte character decodes to U+FFFD instead of raising
    assert tok.decode(list("é".encode())[:1] + [ord("a")]) == "\ufffda"
    import torch

    assert tok.decode(torch.tensor(ids)) == text
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        tok.decode([256])
    with pytest.raises(ValueError, match="str or bytes"):
        tok.encode(3)


def test_embedded_corpus_split_is_deterministic_and_complete():
    a, b = load_corpus(), load_corpus()
    assert a == b
    train, val = a.train.decode(), a.validation.decode()
    keys = sorted(topics)
    for i, key in enumerate(keys):
        inside_val, inside_train = topics[key] in val, topics[key] in train
        assert (inside_val, inside_train) == ((True, False) if i % 20 == 0 else (False, True)), key
    total = len(a.train) + len(a.validation)
    assert total == sum(len(t.encode()) + 2 for t in topics.values())
    assert 0.02 < len(a.validation) / total < 0.08


def test_file_and_folder_corpora(tmp_path):
    f = tmp_path / "one.txt"
    f.write_bytes(bytes(range(32, 127)) * 10)  # 950 bytes
    c = load_corpus(f)
    assert c.train + c.validation == f.read_bytes()
    assert len(c.validation) == 47  # int(950 * 0.05)

    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text("bee")
    (folder / "sub" / "a.txt").write_text("ay")
    (folder / ".hidden").write_text("secret")
    (folder / "blob.bin").write_bytes(b"\x00\x01binary")
    c = load_corpus(folder)
    assert c.train + c.validation == b"bee\n\nay"  # sorted: b.txt < blob.bin(skipped) < sub/a.txt


def test_bad_paths_raise_value_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_corpus(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="holds no text"):
        load_corpus(empty)
    (tmp_path / "void").mkdir()
    with pytest.raises(ValueError, match="holds no text"):
        load_corpus(tmp_path / "void")
    with pytest.raises(ValueError, match="validation_fraction"):
        load_corpus(validation_fraction=1.5)
