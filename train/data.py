"""The training slice: jsonl documents, a seeded token budget, EOS-separated packing, a held-out split.

Documents (RedPajama's schema: `text`, `meta`) are read with the generic `json` builder of `datasets`, from
local files or a hub dataset's jsonl files (the RedPajama sample's own loading script no longer runs). They
are deduplicated, shuffled with a seed and walked in that order: the first documents fill the held-out set,
the next ones the training slice, until the token budget is spent. Each training document is tokenized with
an EOS after it, the stream is packed into `seq_len` blocks with no padding, and labels equal the inputs, so
every EOS stays in the loss (a pad-masking collator with pad = eos would teach the model never to stop).

The packed blocks and the held-out file are saved once under `<run_dir>/data/<key>/`, the key hashing the
tokenizer files, the sources (a local file by its bytes) and the slice settings; a resumed run reads the very same
blocks, also from a run folder that was moved or copied.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import logging
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline.config import TrainDataConfig
from pipeline.errors import UserError, error_reason
from pipeline.models import TOKENIZATION_FILES
from pipeline.runs import atomic_output_dir, write_json_atomic

log = logging.getLogger(__name__)

BUNDLED_SOURCES = {"python-stdlib-docs": Path(__file__).parent / "samples" / "python_stdlib_docs.jsonl.gz"}
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz")
HUB_SOURCE = re.compile(r"^(?P<repo>[\w.-]+/[\w.-]+)(?:/(?P<pattern>.+))?$")
HASH_CHUNK = 8 * 2**20
SLICE_FORMAT = 1  # bump when the slicing or packing rules change, so old caches are not reused
BLOCKS_FILE = "blocks.npy"
HELDOUT_FILE = "heldout.jsonl"
SUMMARY_FILE = "slice.json"


@dataclass(frozen=True)
class DataSource:
    """One entry of `train.data.sources`: the jsonl files it stands for."""

    name: str
    files: tuple[str, ...]  # local paths, or hf:// URLs of a hub dataset's files
    on_hub: bool


def _local_files(source: str) -> list[Path] | None:
    """The jsonl files a local source names (a file, a folder, or a glob); None if nothing local matches."""
    if source in BUNDLED_SOURCES:
        return [BUNDLED_SOURCES[source]]
    path = Path(source).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(JSONL_SUFFIXES))
        if not files:
            raise UserError(f"data folder {path} holds no {'/'.join(JSONL_SUFFIXES)} files")
        return files
    if any(ch in source for ch in "*?["):
        anchor = Path(source).expanduser()
        base = Path(anchor.anchor) if anchor.is_absolute() else Path()
        pattern = str(anchor.relative_to(base)) if anchor.is_absolute() else source
        files = sorted(p for p in base.glob(pattern) if p.is_file())
        return files or None
    return None


def _hub_files(repo: str, pattern: str | None) -> tuple[str, ...]:
    from fnmatch import fnmatch

    from huggingface_hub import list_repo_files

    try:
        names = list_repo_files(repo, repo_type="dataset")
    except Exception as err:
        reason = error_reason(err)
        raise UserError(
            f"cannot list the files of dataset {repo} on the Hugging Face hub ({reason}); check the id and the "
            "network, or give local jsonl files in train.data.sources"
        ) from None
    chosen = [n for n in names if (fnmatch(n, pattern) if pattern else n.endswith(JSONL_SUFFIXES))]
    if not chosen:
        raise UserError(f"dataset {repo} has no files matching {pattern or '*.jsonl'}; fix train.data.sources")
    return tuple(f"hf://datasets/{repo}/{name}" for name in sorted(chosen))


def resolve_source(source: str) -> DataSource:
    """Find the files behind a source; a hub source is listed over the network, a local one never is."""
    local = _local_files(source)
    if local is not None:
        return DataSource(source, tuple(str(p) for p in local), on_hub=False)
    match = HUB_SOURCE.match(source)
    # `dir/file.jsonl` is a missing local file, not a hub repo named like one; `org/name/file.jsonl` is on the hub.
    looks_local = source.startswith((".", "/", "~")) or (match and not match["pattern"] and
                                                         source.endswith(JSONL_SUFFIXES))
    if match and not looks_local:
        return DataSource(source, _hub_files(match["repo"], match["pattern"]), on_hub=True)
    raise UserError(
        f"data source {source!r} not found: give a local jsonl/jsonl.gz file, folder or glob, a hub dataset id "
        f"like togethercomputer/RedPajama-Data-1T-Sample, or one of {', '.join(BUNDLED_SOURCES)}"
    )


@functools.lru_cache(maxsize=256)
def _content_digest(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of a file's bytes; cached per (path, size, mtime) because one run keys its slice more than once."""
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def source_fingerprint(source: str) -> str:
    """What identifies a source's content for the cache key, without touching the network.

    Local files count by their bytes, in the order they are read, never by path or mtime: a run folder carried
    to another box, or copied without keeping mtimes, still finds its slice and resumes, and an edited file is
    still a different slice. Hashing costs seconds per GB, little next to tokenizing the same bytes.
    """
    local = _local_files(source)
    if local is None:
        return f"hub:{source}"
    return ";".join(_content_digest(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in local)


def tokenizer_fingerprint(model_dir: Path) -> str:
    digest = hashlib.sha256()
    found = [name for name in TOKENIZATION_FILES if (model_dir / name).is_file()]
    if not found:
        raise UserError(
            f"{model_dir} has no tokenizer files ({', '.join(TOKENIZATION_FILES[:2])}); copy the tokenizer in"
        )
    for name in found:
        digest.update(name.encode() + b"\0" + (model_dir / name).read_bytes())
    return digest.hexdigest()


def slice_key(settings: TrainDataConfig, seq_len: int, model_dir: Path) -> str:
    payload = {
        "format": SLICE_FORMAT,
        "tokenizer": tokenizer_fingerprint(model_dir),
        "sources": [source_fingerprint(s) for s in settings.sources],
        "tokens": settings.tokens,
        "heldout_fraction": settings.heldout_fraction,
        "seed": settings.seed,
        "seq_len": seq_len,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def check_local_file(path: Path) -> None:
    """Fail fast, naming the file, if a local source is not jsonl with a `text` field."""
    try:
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as handle:
            first = next((line for line in handle if line.strip()), None)
        if first is None:
            raise ValueError("the file is empty")
        record = json.loads(first)
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ValueError("its first record has no string field 'text'")
    except (OSError, EOFError, UnicodeDecodeError, ValueError) as err:
        raise UserError(
            f"data file {path} is not readable jsonl ({err}); fix it or drop it from train.data.sources"
        ) from None


def load_documents(sources: list[DataSource], local_cache: Path):
    """All sources' `text` columns as one `datasets.Dataset` (meta dropped: its fields differ between files)."""
    from datasets import concatenate_datasets, load_dataset

    parts = []
    for source in sources:
        for file in source.files:
            if not source.on_hub:
                check_local_file(Path(file))
            try:
                dataset = load_dataset(
                    "json", data_files=file, split="train", cache_dir=None if source.on_hub else str(local_cache)
                )
            except Exception as err:
                cause = err.__cause__ or err
                reason = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
                raise UserError(
                    f"cannot read data file {file} ({reason}); check it is jsonl with a 'text' field"
                ) from None
            if "text" not in dataset.column_names:
                raise UserError(f"data file {file} has no 'text' field (RedPajama schema: text, meta)")
            parts.append(dataset.select_columns(["text"]))
    return concatenate_datasets(parts)


def shuffled_unique_texts(dataset, seed: int, batch_size: int = 64) -> Iterator[list[str]]:
    """Batches of non-empty texts in a seeded order, each distinct text once (so held-out never repeats train)."""
    seen: set[bytes] = set()
    for batch in dataset.shuffle(seed=seed, keep_in_memory=True).iter(batch_size=batch_size):
        texts = []
        for text in batch["text"]:
            if not text or not text.strip():
                continue
            digest = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
            if digest not in seen:
                seen.add(digest)
                texts.append(text)
        if texts:
            yield texts


@dataclass
class CorpusSlice:
    train_documents: list[list[int]]  # token ids per document, EOS last
    heldout_texts: list[str]
    heldout_tokens: int
    documents_seen: int


def take_slice(
    text_batches: Iterable[list[str]], tokenize, total_tokens: int, heldout_fraction: float
) -> CorpusSlice:
    """Walk documents in order: the first ones fill the held-out share, the next ones the training share.

    Whole documents only; the last training document may run past the budget (packing trims the stream).
    `tokenize` maps a list of texts to lists of ids, EOS included.
    """
    heldout_target = math.ceil(total_tokens * heldout_fraction)
    train_target = total_tokens - heldout_target
    train_docs: list[list[int]] = []
    heldout: list[str] = []
    heldout_tokens = train_tokens = seen = 0
    progress = tqdm(total=total_tokens, unit="tok", unit_scale=True, desc="tokenizing the slice")
    with progress:
        for texts in text_batches:
            for text, ids in zip(texts, tokenize(texts), strict=True):
                seen += 1
                progress.update(len(ids))
                if heldout_tokens < heldout_target:
                    heldout.append(text)
                    heldout_tokens += len(ids)
                    continue
                train_docs.append(ids)
                train_tokens += len(ids)
                if train_tokens >= train_target:
                    return CorpusSlice(train_docs, heldout, heldout_tokens, seen)
    raise UserError(
        f"the data sources hold only {heldout_tokens + train_tokens} tokens in {seen} distinct documents, fewer "
        f"than the slice's train.data.tokens={total_tokens}; lower train.data.tokens or add sources"
    )


def pack_documents(documents: list[list[int]], seq_len: int, budget: int) -> np.ndarray:
    """Concatenate EOS-terminated documents and cut the first `budget` tokens into full `seq_len` blocks.

    No padding anywhere: a block may start mid-document and hold the end of one document, its EOS and the
    start of the next, exactly like the pretraining stream.
    """
    count = budget // seq_len
    if count == 0:
        raise UserError(
            f"the slice's {budget} training tokens do not fill one block of train.seq_len={seq_len}; "
            "raise train.data.tokens or lower train.seq_len"
        )
    stream = np.fromiter((tok for doc in documents for tok in doc), dtype=np.int32)
    return stream[: count * seq_len].reshape(count, seq_len)


class PackedBlocks(torch.utils.data.Dataset):
    """The saved blocks as training examples: labels are the inputs (the model shifts them), nothing masked."""

    def __init__(self, blocks: np.ndarray):
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        input_ids = torch.from_numpy(np.asarray(self.blocks[index], dtype=np.int64))
        return {"input_ids": input_ids, "labels": input_ids.clone()}


@dataclass
class PreparedCorpus:
    folder: Path
    blocks: np.ndarray
    heldout_path: Path
    summary: dict

    def dataset(self) -> PackedBlocks:
        return PackedBlocks(self.blocks)


def make_tokenize(tokenizer):
    """Texts -> ids with the tokenizer's own special tokens (BOS for Llama) and an EOS after every document."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UserError("the model's tokenizer has no EOS token; packed documents need one between them")

    def tokenize(texts: list[str]) -> list[list[int]]:
        return [[*ids, eos] for ids in tokenizer(texts, verbose=False)["input_ids"]]

    return tokenize


def load_prepared(folder: Path) -> PreparedCorpus:
    summary = json.loads((folder / SUMMARY_FILE).read_text())
    blocks = np.load(folder / BLOCKS_FILE, mmap_mode="r")
    return PreparedCorpus(folder, blocks, folder / HELDOUT_FILE, summary)


def prepare_corpus(settings: TrainDataConfig, seq_len: int, model_dir: Path, data_root: Path) -> PreparedCorpus:
    """The packed training blocks and held-out documents for this slice, built once and then reused."""
    key = slice_key(settings, seq_len, model_dir)
    folder = data_root / key
    if (folder / SUMMARY_FILE).is_file():
        prepared = load_prepared(folder)
        log.info("data: reusing the tokenized slice %s (%d blocks of %d tokens)", folder, len(prepared.blocks), seq_len)
        return prepared
    from transformers import AutoTokenizer

    sources = [resolve_source(s) for s in settings.sources]
    log.info("data: reading %d file(s) from %s", sum(len(s.files) for s in sources), ", ".join(settings.sources))
    documents = load_documents(sources, data_root / "hf-datasets")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    corpus = take_slice(
        shuffled_unique_texts(documents, settings.seed), make_tokenize(tokenizer), settings.tokens,
        settings.heldout_fraction,
    )
    train_budget = settings.tokens - math.ceil(settings.tokens * settings.heldout_fraction)
    blocks = pack_documents(corpus.train_documents, seq_len, train_budget)
    summary = {
        "key": key,
        "sources": settings.sources,
        "seed": settings.seed,
        "tokens": settings.tokens,
        "seq_len": seq_len,
        "blocks": len(blocks),
        "train_tokens": int(blocks.size),
        "train_documents": len(corpus.train_documents),
        "heldout_documents": len(corpus.heldout_texts),
        "heldout_tokens": corpus.heldout_tokens,
        "eos_token_id": tokenizer.eos_token_id,
    }
    with atomic_output_dir(folder, force=True) as tmp:
        np.save(tmp / BLOCKS_FILE, blocks)
        with open(tmp / HELDOUT_FILE, "w", encoding="utf-8") as handle:
            for text in corpus.heldout_texts:
                handle.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
        write_json_atomic(tmp / SUMMARY_FILE, summary)
    log.info(
        "data: %d training documents -> %d blocks of %d tokens; %d held-out documents (%d tokens)",
        summary["train_documents"], summary["blocks"], seq_len, summary["heldout_documents"], corpus.heldout_tokens,
    )
    return load_prepared(folder)
