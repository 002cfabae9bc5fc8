"""The training slice: EOS-separated packing that keeps EOS in the loss, a disjoint held-out split, a seeded
and cached slice, the bundled corpus, and one-line errors for data that cannot make a slice."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, default_data_collator

from pipeline.config import TrainDataConfig
from pipeline.errors import UserError
from train.data import (
    BUNDLED_SOURCES,
    PackedBlocks,
    make_tokenize,
    pack_documents,
    prepare_corpus,
    resolve_source,
)

ANIMALS = ["heron", "badger", "otter", "lynx", "marten", "stoat", "beaver", "vole"]


def write_jsonl(path: Path, texts: list[str]) -> Path:
    with open(path, "w", encoding="utf-8") as handle:
        for text in texts:
            handle.write(json.dumps({"text": text, "meta": {"redpajama_set_name": "Test"}}) + "\n")
    return path


def marked_documents(count: int) -> list[str]:
    """Documents of a few dozen tokens, each carrying one unique marker, each present twice (exact duplicates)."""
    texts = [
        f"Record D{i:03d}X. The {ANIMALS[i % 8]} walked along the river for {i + 3} miles before it rested. "
        f"Nobody in the village of {ANIMALS[(i * 3) % 8].title()}ford had seen it since the spring fair."
        for i in range(count)
    ]
    return texts + texts


def markers(text: str) -> set[str]:
    return set(re.findall(r"D\d{3}X", text))


def test_packing_puts_eos_between_documents_and_never_masks_it(smollm2_dir):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    eos = tokenizer.eos_token_id
    texts = ["The first document ends here.", "A second one, a little longer than the first.", "Third."]
    documents = make_tokenize(tokenizer)(texts)
    assert all(doc[-1] == eos and eos not in doc[:-1] for doc in documents)
    total = sum(len(doc) for doc in documents)
    blocks = pack_documents(documents, seq_len=8, budget=total)
    stream = blocks.reshape(-1).tolist()
    boundaries = np.cumsum([len(doc) for doc in documents]) - 1
    for end in boundaries[boundaries < len(stream)]:
        assert stream[end] == eos  # the EOS sits exactly where each document ends, nothing padded in between
    assert stream == [tok for doc in documents for tok in doc][: len(stream)]

    batch = default_data_collator([PackedBlocks(blocks)[i] for i in range(len(blocks))])
    assert torch.equal(batch["labels"], batch["input_ids"])
    assert (batch["labels"] == eos).sum() == (batch["input_ids"] == eos).sum() > 0
    assert not (batch["labels"] == -100).any()


def test_heldout_split_shares_no_document_with_the_training_slice(tmp_path, smollm2_dir):
    texts = marked_documents(60)
    source = write_jsonl(tmp_path / "corpus.jsonl", texts)
    settings = TrainDataConfig(sources=[str(source)], tokens=2000, heldout_fraction=0.2, seed=3)
    corpus = prepare_corpus(settings, 64, smollm2_dir, tmp_path / "data")

    heldout = [json.loads(line)["text"] for line in corpus.heldout_path.read_text().splitlines()]
    assert heldout and all(text in texts for text in heldout)  # whole documents, verbatim
    assert len(set(heldout)) == len(heldout)
    training_text = AutoTokenizer.from_pretrained(smollm2_dir).decode(corpus.blocks.reshape(-1).tolist())
    heldout_markers = set().union(*(markers(t) for t in heldout))
    assert markers(training_text) and not heldout_markers & markers(training_text)
    assert corpus.summary["heldout_tokens"] >= 0.2 * 2000
    assert corpus.blocks.shape == (int(2000 * 0.8) // 64, 64)


def test_slice_is_seeded_cached_and_reused(tmp_path, smollm2_dir):
    source = write_jsonl(tmp_path / "corpus.jsonl", marked_documents(80))
    settings = TrainDataConfig(sources=[str(source)], tokens=1500, heldout_fraction=0.1, seed=0)
    first = prepare_corpus(settings, 32, smollm2_dir, tmp_path / "data")
    blocks_file = first.folder / "blocks.npy"
    written = blocks_file.stat().st_mtime_ns
    again = prepare_corpus(settings, 32, smollm2_dir, tmp_path / "data")
    assert again.folder == first.folder and blocks_file.stat().st_mtime_ns == written
    assert np.array_equal(np.asarray(again.blocks), np.asarray(first.blocks))
    reseeded = prepare_corpus(settings.model_copy(update={"seed": 1}), 32, smollm2_dir, tmp_path / "data")
    assert reseeded.folder != first.folder
    assert not np.array_equal(np.asarray(reseeded.blocks), np.asarray(first.blocks))


def test_bundled_corpus_is_real_english_in_redpajama_schema():
    path = BUNDLED_SOURCES["python-stdlib-docs"]
    assert resolve_source("python-stdlib-docs").files == (str(path),)
    assert path.stat().st_size < 1_000_000
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle]
    text = "\n".join(record["text"] for record in records)
    assert len(text) > 300_000 and len(records) > 100
    assert all(record["meta"]["redpajama_set_name"] for record in records)
    words = re.findall(r"[a-z]+", text.lower())
    for common in ("the", "return", "is", "of", "and"):
        assert words.count(common) > 1000


def test_slice_larger_than_the_data_names_the_problem(tmp_path, smollm2_dir):
    source = write_jsonl(tmp_path / "small.jsonl", marked_documents(20))
    settings = TrainDataConfig(sources=[str(source)], tokens=1_000_000)
    with pytest.raises(UserError, match=r"hold only \d+ tokens in 20 distinct documents.*train\.data\.tokens"):
        prepare_corpus(settings, 64, smollm2_dir, tmp_path / "data")
    assert not list((tmp_path / "data").glob("*/blocks.npy"))


@pytest.mark.parametrize(
    ("name", "content", "fragment"),
    [
        ("broken.jsonl.gz", b"this is not gzip", "not readable jsonl"),
        ("notext.jsonl", b'{"body": "no text field"}\n', "no string field 'text'"),
        ("empty.jsonl", b"", "the file is empty"),
    ],
)
def test_unreadable_data_names_the_file(tmp_path, smollm2_dir, name, content, fragment):
    bad = tmp_path / name
    bad.write_bytes(content)
    settings = TrainDataConfig(sources=[str(bad)], tokens=100)
    with pytest.raises(UserError, match=re.escape(str(bad)) + ".*" + re.escape(fragment)):
        prepare_corpus(settings, 16, smollm2_dir, tmp_path / "data")


@pytest.mark.parametrize("source", ["./nowhere.jsonl", "data/nowhere.jsonl.gz", "/abs/none/*.jsonl"])
def test_missing_local_data_source_names_it_without_asking_the_hub(source):
    with pytest.raises(UserError, match=f"data source {re.escape(repr(source))} not found"):
        resolve_source(source)
