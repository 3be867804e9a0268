"""Data sources, tokenization and packing: text in, a fingerprinted (n_sequences, seq_len) int32 array out.

Documents are streamed one at a time from any source, tokenized in batches without special tokens,
joined into one token stream with a separator token between documents, and cut into consecutive
fixed-length sequences (each optionally led by BOS). Reading stops as soon as enough tokens exist.
`pad_documents` is the other packing: one document per sequence, right-padded, for prompt sets
whose last token is the position under study.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from array import array
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError
from . import corpus

BUILTINS: dict[str, Callable[[], Iterator[str]]] = {"stdlib-docstrings": corpus.stdlib_docstrings}

_JSONL_SUFFIXES = (".jsonl", ".json")
_PARQUET_SUFFIXES = (".parquet",)
_HF_SAVED_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
_ROWS_PER_BATCH = 256  # rows read at once from Parquet and datasets
_DOCS_PER_CALL = 256  # the most documents per call to the tokenizer
_CHARS_PER_CALL = 1 << 22  # ... or fewer when they are this long, to bound memory
_REENCODE_HINT = "re-encode it as UTF-8, e.g. `iconv -f LATIN1 -t UTF-8 in.txt > out.txt`"


@dataclass(frozen=True)
class DataSpec:
    """Where the text comes from and how to cut it into documents."""

    source: str  # a file, a directory, "hf:NAME" (Hugging Face hub dataset), or "builtin:NAME"
    text_field: str = "text"  # JSONL / Parquet / datasets column
    split: str = "train"  # datasets split
    config: str | None = None  # Hugging Face dataset config name
    doc_regex: str | None = None  # plain text only: a document starts at each line matching it

    def to_dict(self) -> dict:
        """JSON-able form, stored in the store's metadata."""
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# Reading documents


def iter_documents(spec: DataSpec) -> Iterator[str]:
    """Yield the non-blank documents of `spec.source` lazily, in a deterministic order.

    `doc_regex` splits plain text files (in a directory: its plain text files) and is refused for a
    structured source. Raises DataError when the source is missing, unreadable, malformed, or holds
    no documents.
    """
    doc_regex = _compile_doc_regex(spec.doc_regex)
    n = 0
    for doc in _raw_documents(spec, doc_regex):
        if doc is not None and doc.strip():
            n += 1
            yield doc
    if n == 0:
        raise DataError(f"no documents in {spec.source} (no non-blank text)")


def _compile_doc_regex(pattern: str | None) -> re.Pattern[str] | None:
    if pattern is None:
        return None
    try:
        return re.compile(pattern, re.MULTILINE)
    except re.error as e:
        raise DataError(f"doc_regex {pattern!r} is not a valid regular expression: {e}") from None


def _raw_documents(spec: DataSpec, doc_regex: re.Pattern[str] | None) -> Iterator[str | None]:
    source = spec.source
    if source.startswith("builtin:"):
        _reject_doc_regex(spec, "a builtin corpus")
        return _builtin(source.removeprefix("builtin:"))
    if source.startswith("hf:"):
        _reject_doc_regex(spec, "a Hugging Face dataset")
        return _hub_dataset(spec)
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"data source not found: {source}")
    if path.is_dir():
        if _is_saved_dataset(path):
            _reject_doc_regex(spec, "a saved Hugging Face dataset")
            return _saved_dataset(path, spec)
        return _directory(path, spec, doc_regex)
    if not _is_plain(path):
        _reject_doc_regex(spec, f"{path.suffix} files")
    return _file(path, spec, doc_regex)


def _reject_doc_regex(spec: DataSpec, what: str) -> None:
    # Silently ignoring it would leave the user believing their documents were split.
    if spec.doc_regex is not None:
        raise DataError(f"doc_regex applies to plain text files only, not to {what} ({spec.source})")


def _builtin(name: str) -> Iterator[str]:
    if name not in BUILTINS:
        known = ", ".join(f"builtin:{k}" for k in sorted(BUILTINS))
        raise DataError(f"unknown builtin corpus 'builtin:{name}'; known: {known}")
    return BUILTINS[name]()


def _is_plain(path: Path) -> bool:
    return path.suffix.lower() not in _JSONL_SUFFIXES + _PARQUET_SUFFIXES


def _file(path: Path, spec: DataSpec, doc_regex: re.Pattern[str] | None) -> Iterator[str | None]:
    suffix = path.suffix.lower()
    if suffix in _JSONL_SUFFIXES:
        return _jsonl(path, spec.text_field)
    if suffix in _PARQUET_SUFFIXES:
        return _parquet(path, spec.text_field)
    return _plain(path, doc_regex)


def _directory(root: Path, spec: DataSpec, doc_regex: re.Pattern[str] | None) -> Iterator[str | None]:
    """Every non-hidden file under `root`, recursively, in sorted relative-path order."""
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=_raise_walk_error):
        # Hidden entries are version-control and editor metadata (.git, .DS_Store), not data.
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith("."):
                path = Path(dirpath) / name
                found.append((path.relative_to(root).as_posix(), path))
    for _, path in sorted(found):
        yield from _file(path, spec, doc_regex)


def _raise_walk_error(e: OSError) -> None:
    raise DataError(f"cannot read directory {e.filename}: {e.strerror}")


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) of a strictly UTF-8 file; CRLF line ends are read as LF."""
    offset = 0
    try:
        with path.open("rb") as f:
            for number, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(
                        f"{path} is not valid UTF-8: byte offset {offset + e.start} (line {number}) "
                        f"holds byte 0x{raw[e.start]:02x}; {_REENCODE_HINT}"
                    ) from None
                if number == 1:
                    line = line.removeprefix("\ufeff")  # a UTF-8 byte-order mark is not text
                if line.endswith("\r\n"):
                    line = line[:-2] + "\n"
                offset += len(raw)
                yield number, line
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None


def _plain(path: Path, doc_regex: re.Pattern[str] | None) -> Iterator[str]:
    """The whole file as one document, or a new document at each line matching `doc_regex`."""
    current: list[str] = []
    for _, line in _lines(path):
        # Match the line without its end so that `$` and `^$` mean what they do on the line itself.
        if doc_regex is not None and current and doc_regex.search(line.rstrip("\n")):
            yield "".join(current)
            current = []
        current.append(line)
    yield "".join(current)


def _jsonl(path: Path, field: str) -> Iterator[str | None]:
    for number, line in _lines(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path} line {number}: invalid JSON ({e.msg}); .json/.jsonl files are read as JSON "
                f"lines, one object per line"
            ) from None
        if not isinstance(row, dict):
            raise DataError(f"{path} line {number}: expected a JSON object, got {type(row).__name__}")
        if field not in row:
            raise DataError(
                f"{path} line {number}: no field {field!r} (set text_field); "
                f"this line has fields {sorted(row)}"
            )
        yield _text_value(row[field], f"{path} line {number}, field {field!r}")


def _text_value(value: Any, where: str) -> str | None:
    """A text cell; null counts as an empty document."""
    if value is None or isinstance(value, str):
        return value
    raise DataError(f"{where}: expected a string, got {type(value).__name__}")


def _parquet(path: Path, field: str) -> Iterator[str | None]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"cannot read Parquet file {path}: {e}") from None
    columns = pf.schema_arrow.names
    if field not in columns:
        raise DataError(f"{path}: no column {field!r} (set text_field); columns present: {columns}")
    kind = pf.schema_arrow.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise DataError(f"{path}: column {field!r} holds {kind}, not strings")
    try:
        for batch in pf.iter_batches(batch_size=_ROWS_PER_BATCH, columns=[field]):
            yield from batch.column(0).to_pylist()
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"cannot read Parquet file {path}: {e}") from None


def _import_datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise DataError(
            "reading Hugging Face datasets needs the `datasets` package: pip install 'lenscache[datasets]'"
        ) from None
    return datasets


def _is_saved_dataset(path: Path) -> bool:
    return any((path / marker).is_file() for marker in _HF_SAVED_MARKERS)


def _saved_dataset(path: Path, spec: DataSpec) -> Iterator[str | None]:
    datasets = _import_datasets()
    try:
        loaded = datasets.load_from_disk(str(path))
    except (OSError, ValueError) as e:
        raise DataError(f"cannot load the saved dataset at {path}: {e}") from None
    if isinstance(loaded, datasets.DatasetDict):
        if spec.split not in loaded:
            raise DataError(f"{path}: no split {spec.split!r}; splits present: {sorted(loaded)}")
        loaded = loaded[spec.split]
    if spec.text_field not in loaded.column_names:
        raise DataError(
            f"{path}: no column {spec.text_field!r} (set text_field); columns present: {loaded.column_names}"
        )
    where = f"{path} column {spec.text_field!r}"
    for batch in loaded.select_columns([spec.text_field]).iter(batch_size=_ROWS_PER_BATCH):
        for value in batch[spec.text_field]:
            yield _text_value(value, where)


def _hub_dataset(spec: DataSpec) -> Iterator[str | None]:
    name = spec.source.removeprefix("hf:")
    if not name:
        raise DataError("hf: needs a dataset name, e.g. hf:Salesforce/wikitext")
    datasets = _import_datasets()
    try:
        stream = datasets.load_dataset(name, spec.config, split=spec.split, streaming=True)
    except Exception as e:  # network, authentication, unknown name/config/split: all user-fixable
        raise DataError(f"cannot load Hugging Face dataset {name!r}: {type(e).__name__}: {e}") from None
    where = f"hf:{name} split {spec.split!r}"
    for row in stream:
        if spec.text_field not in row:
            raise DataError(f"{where}: no field {spec.text_field!r} (set text_field); fields: {sorted(row)}")
        yield _text_value(row[spec.text_field], f"{where} field {spec.text_field!r}")


# ---------------------------------------------------------------------------------------------
# Packing


@dataclass
class PackedTokens:
    """Token sequences cut from the data, with what is needed to reproduce and recognise them."""

    tokens: np.ndarray  # int32, shape (n_sequences, seq_len)
    n_documents: int  # documents consumed (wholly or partly)
    bos_token_id: int | None  # prepended to every sequence, or None
    separator_token_id: int | None  # placed between consecutive documents
    fingerprint: str  # "sha256:<hex>" over the spec, seq_len, bos/separator ids and the token bytes
    # padded packing only: each sequence's real length (its document, plus BOS) and the padding id
    lengths: np.ndarray | None = None
    pad_token_id: int | None = None

    def describe(self) -> dict:
        """JSON-able summary for the store's metadata."""
        n_sequences, seq_len = self.tokens.shape
        out = {
            "packing": "packed" if self.lengths is None else "padded",
            "n_sequences": int(n_sequences),
            "seq_len": int(seq_len),
            "n_tokens": int(self.tokens.size),
            "n_documents": self.n_documents,
            "bos_token_id": self.bos_token_id,
            "separator_token_id": self.separator_token_id,
            "fingerprint": self.fingerprint,
        }
        if self.lengths is not None:
            out["pad_token_id"] = self.pad_token_id
            out["lengths"] = [int(n) for n in self.lengths]
        return out


def tokenizer_adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer's default encoding starts with its BOS token (as Llama's and Gemma's do)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer.encode("a")[:1] == [bos]


def check_packing(seq_len: int, max_tokens: int | None) -> None:
    """Refuse packing settings that cannot give a sequence (cheap: no tokenizer needed)."""
    if seq_len < 2:
        raise DataError(f"seq_len must be at least 2, got {seq_len}")
    if max_tokens is not None and max_tokens < seq_len:
        raise DataError(f"max_tokens ({max_tokens}) is smaller than one sequence (seq_len {seq_len})")


def check_source(spec: DataSpec) -> None:
    """Open `spec` and read its first document, so a missing or malformed source fails in a second,
    before a model is loaded. Hub datasets are only checked for a name (reading one is the slow part)."""
    if spec.source.startswith("hf:"):
        if not spec.source.removeprefix("hf:"):
            raise DataError("hf: needs a dataset name, e.g. hf:Salesforce/wikitext")
        _import_datasets()
        return
    with closing(iter_documents(spec)) as docs:
        next(docs)


def pack_tokens(
    spec: DataSpec,
    tokenizer: Any,
    seq_len: int,
    max_tokens: int | None = None,
    *,
    prepend_bos: bool | None = None,
    separator: str | None = None,
) -> PackedTokens:
    """Tokenize the documents of `spec` and cut them into consecutive sequences of `seq_len` tokens.

    prepend_bos: lead every sequence with BOS; None follows the tokenizer (`tokenizer_adds_bos`).
    separator: token placed between documents; None uses EOS, else BOS, else nothing.
    max_tokens: at most max_tokens // seq_len sequences; reading stops once they are filled.
    The final partial sequence is dropped.
    """
    check_packing(seq_len, max_tokens)
    bos = _bos_id(tokenizer, prepend_bos)
    sep = _separator_id(tokenizer, separator)
    body = seq_len - 1 if bos is not None else seq_len
    wanted = None if max_tokens is None else (max_tokens // seq_len) * body

    # Closing the documents as soon as enough tokens exist releases open files and dataset streams.
    with closing(iter_documents(spec)) as docs:
        stream, doc_starts = _token_stream(docs, tokenizer, sep, wanted)
    n_sequences = len(stream) // body
    if wanted is not None:
        n_sequences = min(n_sequences, wanted // body)
    if n_sequences == 0:
        extra = " after BOS" if bos is not None else ""
        raise DataError(
            f"{spec.source} gave only {len(stream)} tokens; one sequence of seq_len {seq_len} "
            f"needs {body}{extra}"
        )
    used = n_sequences * body
    tokens = np.empty((n_sequences, seq_len), dtype=np.int32)
    if bos is not None:
        tokens[:, 0] = bos
        tokens[:, 1:] = stream[:used].reshape(n_sequences, body)
    else:
        tokens[:] = stream[:used].reshape(n_sequences, body)
    return PackedTokens(
        tokens=tokens,
        n_documents=bisect_left(doc_starts, used),
        bos_token_id=bos,
        separator_token_id=sep,
        fingerprint=_fingerprint(spec, seq_len, bos, sep, tokens),
    )


def pad_documents(
    spec: DataSpec,
    tokenizer: Any,
    seq_len: int,
    max_tokens: int | None = None,
    *,
    prepend_bos: bool | None = None,
) -> PackedTokens:
    """One sequence per document, right-padded to `seq_len`: prompt sets, where position
    ``lengths[i] - 1`` is the one under study.

    Padding goes after the document, so in a causal model it cannot change any of the document's
    positions: their residuals are those of the document run alone. The padding id is the
    tokenizer's PAD, else EOS, else 0. A document longer than `seq_len` is refused (a prompt cut
    short would silently move the position under study); empty documents are skipped.
    max_tokens: at most max_tokens // seq_len documents.
    """
    check_packing(seq_len, max_tokens)
    bos = _bos_id(tokenizer, prepend_bos)
    pad = next((int(t) for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
    wanted = None if max_tokens is None else max_tokens // seq_len
    rows: list[list[int]] = []
    with closing(iter_documents(spec)) as docs:
        for batch in _batches(docs):
            for ids in tokenizer(batch, add_special_tokens=False, return_attention_mask=False)["input_ids"]:
                if not ids:
                    continue
                row = ([bos] if bos is not None else []) + list(ids)
                if len(row) > seq_len:
                    raise DataError(
                        f"document {len(rows)} of {spec.source} has {len(row)} tokens, more than seq_len "
                        f"{seq_len}; padded packing keeps whole documents: raise --seq-len"
                    )
                rows.append(row)
                if wanted is not None and len(rows) >= wanted:
                    break
            if wanted is not None and len(rows) >= wanted:
                break
    if not rows:
        raise DataError(f"{spec.source} gave no non-empty document")
    tokens = np.full((len(rows), seq_len), pad, dtype=np.int32)
    lengths = np.array([len(r) for r in rows], dtype=np.int32)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = row
    header = _fingerprint(spec, seq_len, bos, None, tokens)
    digest = hashlib.sha256(f"{header}|padded|{pad}|".encode() + lengths.astype("<i4").tobytes()).hexdigest()
    return PackedTokens(
        tokens=tokens,
        n_documents=len(rows),
        bos_token_id=bos,
        separator_token_id=None,
        fingerprint=f"sha256:{digest}",
        lengths=lengths,
        pad_token_id=pad,
    )


def _bos_id(tokenizer: Any, prepend_bos: bool | None) -> int | None:
    if prepend_bos is None:
        prepend_bos = tokenizer_adds_bos(tokenizer)
    if not prepend_bos:
        return None
    if tokenizer.bos_token_id is None:
        raise DataError("prepend_bos was requested but the tokenizer has no BOS token")
    return int(tokenizer.bos_token_id)


def _separator_id(tokenizer: Any, separator: str | None) -> int | None:
    if separator is None:
        for default in (tokenizer.eos_token_id, tokenizer.bos_token_id):
            if default is not None:
                return int(default)
        return None
    sep = tokenizer.convert_tokens_to_ids(separator)
    # Unknown tokens come back as the UNK id (or None when there is no UNK token).
    if sep is None or (sep == tokenizer.unk_token_id and separator != tokenizer.unk_token):
        raise DataError(f"separator {separator!r} is not a token in the tokenizer's vocabulary")
    return int(sep)


def _batches(docs: Iterable[str]) -> Iterator[list[str]]:
    """Groups of documents for one tokenizer call each.

    Groups start at one document and double, so that a small max_tokens reads few documents
    beyond those it needs while a long run still gets large, fast batched calls.
    """
    batch: list[str] = []
    chars = 0
    size = 1
    for doc in docs:
        batch.append(doc)
        chars += len(doc)
        if len(batch) >= size or chars >= _CHARS_PER_CALL:
            yield batch
            batch, chars = [], 0
            size = min(2 * size, _DOCS_PER_CALL)
    if batch:
        yield batch


def _token_stream(
    docs: Iterator[str], tokenizer: Any, sep: int | None, wanted: int | None
) -> tuple[np.ndarray, array]:
    """The int32 stream doc0 [sep] doc1 [sep] ..., at least `wanted` long when the data allows,
    and the stream offset of each document's first token."""
    chunks: list[np.ndarray] = []
    doc_starts = array("q")
    length = 0
    for batch in _batches(docs):
        encoded = tokenizer(
            batch,
            add_special_tokens=False,
            return_attention_mask=False,
            return_token_type_ids=False,
            verbose=False,  # long documents are fine: they are cut, not fed to the model whole
        )["input_ids"]
        flat: list[int] = []
        for ids in encoded:
            if not ids:
                continue
            if sep is not None and (length or flat):
                flat.append(sep)
            doc_starts.append(length + len(flat))
            flat.extend(ids)
        chunks.append(np.asarray(flat, dtype=np.int32))
        length += len(flat)
        if wanted is not None and length >= wanted:
            break
    stream = np.concatenate(chunks) if chunks else np.empty(0, dtype=np.int32)
    return stream, doc_starts


def _fingerprint(spec: DataSpec, seq_len: int, bos: int | None, sep: int | None, tokens: np.ndarray) -> str:
    header = json.dumps(
        {"spec": spec.to_dict(), "seq_len": seq_len, "bos_token_id": bos, "separator_token_id": sep},
        sort_keys=True,
    )
    h = hashlib.sha256(header.encode("utf-8"))
    h.update(b"\0")
    h.update(np.ascontiguousarray(tokens, dtype="<i4").tobytes())
    return f"sha256:{h.hexdigest()}"
