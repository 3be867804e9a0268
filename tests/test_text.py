"""Data sources, packing arithmetic, fingerprints, early stopping and every user-facing DataError."""

from __future__ import annotations

import itertools
import json
import sysconfig
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tiny_models import make_tokenizer

from lenscache.cache import corpus, text
from lenscache.cache.text import DataSpec, iter_documents, pack_tokens, tokenizer_adds_bos
from lenscache.errors import DataError

DOCS = ["Hello world.", "Paris is the capital of France.", "The quick brown fox jumps."]


@pytest.fixture(scope="module")
def bos_tok(tmp_path_factory):
    """Llama-like: prepends <s>, eos </s>."""
    return make_tokenizer(tmp_path_factory.mktemp("bos_tok"), add_bos=True)


@pytest.fixture(scope="module")
def plain_tok(tmp_path_factory):
    """GPT-2-like: no BOS added; <|endoftext|> is both bos and eos."""
    return make_tokenizer(tmp_path_factory.mktemp("plain_tok"), add_bos=False)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def docs_of(source: Path | str, **kw) -> list[str]:
    return list(iter_documents(DataSpec(str(source), **kw)))


# ---------------------------------------------------------------------------------------------
# Sources


def test_plain_file_is_one_document(tmp_path):
    body = "First line.\nSecond line.\n"
    (tmp_path / "a.txt").write_text(body, encoding="utf-8")
    assert docs_of(tmp_path / "a.txt") == [body]


def test_doc_regex_starts_a_document_at_each_matching_line(tmp_path):
    raw = " \n = Alpha = \n alpha body\n = = Section = = \n more alpha\n = Beta = \n beta body\n"
    (tmp_path / "wiki.raw").write_text(raw, encoding="utf-8")
    docs = docs_of(tmp_path / "wiki.raw", doc_regex=r"^ = [^=]")
    # the blank preamble is dropped; subsection headings stay inside their article
    assert docs == [
        " = Alpha = \n alpha body\n = = Section = = \n more alpha\n",
        " = Beta = \n beta body\n",
    ]


def test_doc_regex_matches_lines_without_their_ending(tmp_path):
    (tmp_path / "a.txt").write_text("one\n\ntwo\n\nthree\n", encoding="utf-8")
    assert docs_of(tmp_path / "a.txt", doc_regex="^$") == ["one\n", "\ntwo\n", "\nthree\n"]


def test_crlf_and_byte_order_mark_are_not_text(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"\xef\xbb\xbfline one\r\nline two\r\n")
    assert docs_of(tmp_path / "a.txt") == ["line one\nline two\n"]


def test_jsonl_reads_the_text_field_and_skips_blank_documents(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(
        '{"text": "one", "id": 1}\n\n{"text": "   "}\n{"text": null}\n{"body": "x", "text": "two"}\n',
        encoding="utf-8",
    )
    assert docs_of(path) == ["one", "two"]
    write_jsonl(tmp_path / "e.json", [{"body": "b1"}, {"body": "b2"}])
    assert docs_of(tmp_path / "e.json", text_field="body") == ["b1", "b2"]


def test_parquet_is_read_in_order_across_batches_and_row_groups(tmp_path):
    values = [f"document number {i}" for i in range(700)]
    table = pa.table({"id": list(range(700)), "content": values})
    pq.write_table(table, tmp_path / "d.parquet", row_group_size=300)
    assert docs_of(tmp_path / "d.parquet", text_field="content") == values


def test_directory_reads_every_file_recursively_in_sorted_order(tmp_path):
    root = tmp_path / "corpus"
    (root / "b").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("not data", encoding="utf-8")
    (root / ".DS_Store").write_text("not data", encoding="utf-8")
    (root / "c.txt").write_text(" = C1 = \nc1\n = C2 = \nc2\n", encoding="utf-8")
    write_jsonl(root / "b" / "x.jsonl", [{"text": "jsonl 1"}, {"text": "jsonl 2"}])
    pq.write_table(pa.table({"text": ["parquet 1"]}), root / "b" / "y.parquet")
    (root / "a.txt").write_text("plain a", encoding="utf-8")
    docs = docs_of(root, doc_regex=r"^ = [^=]")
    assert docs == ["plain a", "jsonl 1", "jsonl 2", "parquet 1", " = C1 = \nc1\n", " = C2 = \nc2\n"]


def test_saved_hugging_face_dataset_and_dataset_dict(tmp_path):
    datasets = pytest.importorskip("datasets")
    single = datasets.Dataset.from_dict({"text": ["a one", "", "a two"], "n": [1, 2, 3]})
    single.save_to_disk(str(tmp_path / "single"))
    assert docs_of(tmp_path / "single") == ["a one", "a two"]

    both = datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"body": ["train doc"]}),
        validation=datasets.Dataset.from_dict({"body": ["val doc 1", "val doc 2"]}),
    )
    both.save_to_disk(str(tmp_path / "dict"))
    assert docs_of(tmp_path / "dict", text_field="body") == ["train doc"]
    assert docs_of(tmp_path / "dict", text_field="body", split="validation") == ["val doc 1", "val doc 2"]
    with pytest.raises(DataError, match=r"no split 'test'.*\['train', 'validation'\]"):
        docs_of(tmp_path / "dict", text_field="body", split="test")
    with pytest.raises(DataError, match=r"no column 'text'.*\['body'\]"):
        docs_of(tmp_path / "dict")


def test_data_spec_round_trips_through_its_dict():
    spec = DataSpec("hf:some/name", "content", "validation", "raw", None)
    as_dict = spec.to_dict()
    assert json.loads(json.dumps(as_dict)) == as_dict
    assert DataSpec(**as_dict) == spec


# ---------------------------------------------------------------------------------------------
# Every DataError


def test_non_utf8_names_the_file_and_byte_offset(tmp_path):
    path = tmp_path / "latin1.txt"
    raw = b"first line\nsecond caf\xe9 line\n"
    path.write_bytes(raw)
    with pytest.raises(DataError) as e:
        docs_of(path)
    message = str(e.value)
    assert str(path) in message and f"byte offset {raw.index(0xE9)} " in message and "line 2" in message
    assert "UTF-8" in message and "re-encode" in message


def test_jsonl_missing_field_names_field_file_line_and_the_fields_present(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "ok"}, {"body": "x", "title": "y"}])
    with pytest.raises(DataError) as e:
        docs_of(path)
    message = str(e.value)
    assert "'text'" in message and str(path) in message and "line 2" in message
    assert "['body', 'title']" in message


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ('{"text": "ok"}\n{"text": broken}\n', "line 2: invalid JSON"),
        ('["a", "b"]\n', "line 1: expected a JSON object"),
        ('{"text": 3}\n', "expected a string, got int"),
    ],
)
def test_malformed_jsonl(tmp_path, content, problem):
    path = tmp_path / "d.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=problem) as e:
        docs_of(path)
    assert str(path) in str(e.value)


def test_parquet_missing_column_lists_the_columns(tmp_path):
    pq.write_table(pa.table({"body": ["x"], "id": [1]}), tmp_path / "d.parquet")
    with pytest.raises(DataError, match=r"no column 'text'.*\['body', 'id'\]"):
        docs_of(tmp_path / "d.parquet")


@pytest.mark.parametrize("content", ["", "  \n\t\n"])
def test_empty_source(tmp_path, content):
    (tmp_path / "empty.txt").write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match="no documents in .*empty.txt"):
        docs_of(tmp_path / "empty.txt")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match="no documents in .*empty_dir"):
        docs_of(tmp_path / "empty_dir")


def test_missing_path(tmp_path):
    with pytest.raises(DataError, match="not found: .*nowhere.txt"):
        docs_of(tmp_path / "nowhere.txt")


def test_unknown_builtin_lists_the_known_ones():
    with pytest.raises(DataError, match=r"builtin:nope.*builtin:stdlib-docstrings"):
        docs_of("builtin:nope")


def test_bad_doc_regex_and_doc_regex_on_structured_data(tmp_path):
    (tmp_path / "a.txt").write_text("x", encoding="utf-8")
    with pytest.raises(DataError, match="not a valid regular expression"):
        docs_of(tmp_path / "a.txt", doc_regex="(")
    write_jsonl(tmp_path / "d.jsonl", [{"text": "x"}])
    with pytest.raises(DataError, match="plain text files only"):
        docs_of(tmp_path / "d.jsonl", doc_regex="^x")


def test_too_short_says_how_many_tokens_and_what_is_needed(tmp_path, plain_tok):
    (tmp_path / "a.txt").write_text("Hello world.", encoding="utf-8")
    n = len(plain_tok.encode("Hello world.", add_special_tokens=False))
    with pytest.raises(DataError, match=rf"gave only {n} tokens; one sequence of seq_len 64 needs 64"):
        pack_tokens(DataSpec(str(tmp_path / "a.txt")), plain_tok, 64)


def test_bad_packing_options(tmp_path, bos_tok, plain_tok):
    spec = DataSpec(str(write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in DOCS])))
    with pytest.raises(DataError, match="seq_len must be at least 2"):
        pack_tokens(spec, bos_tok, 1)
    with pytest.raises(DataError, match=r"max_tokens \(7\) is smaller than one sequence \(seq_len 8\)"):
        pack_tokens(spec, bos_tok, 8, 7)
    with pytest.raises(DataError, match="separator '<nope>' is not a token"):
        pack_tokens(spec, bos_tok, 4, separator="<nope>")
    plain_tok_without_bos = plain_tok.__class__(
        tokenizer_object=plain_tok.backend_tokenizer, eos_token="<|endoftext|>"
    )
    with pytest.raises(DataError, match="no BOS token"):
        pack_tokens(spec, plain_tok_without_bos, 4, prepend_bos=True)


# ---------------------------------------------------------------------------------------------
# Packing


def test_tokenizer_adds_bos(bos_tok, plain_tok):
    assert tokenizer_adds_bos(bos_tok) is True
    assert tokenizer_adds_bos(plain_tok) is False


def expected_stream(tok, docs: list[str], sep: int | None) -> list[int]:
    stream: list[int] = []
    for i, doc in enumerate(docs):
        if i and sep is not None:
            stream.append(sep)
        stream.extend(tok.encode(doc, add_special_tokens=False))
    return stream


def test_packing_with_bos_and_eos_separator_has_the_exact_layout(tmp_path, bos_tok):
    spec = DataSpec(str(write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in DOCS])))
    bos, eos = bos_tok.bos_token_id, bos_tok.eos_token_id
    stream = expected_stream(bos_tok, DOCS, eos)
    seq_len = 5
    n = len(stream) // (seq_len - 1)
    packed = pack_tokens(spec, bos_tok, seq_len)
    expected = [[bos, *stream[i * 4 : (i + 1) * 4]] for i in range(n)]
    assert packed.tokens.dtype == np.int32 and packed.tokens.shape == (n, seq_len)
    assert packed.tokens.tolist() == expected
    assert packed.bos_token_id == bos and packed.separator_token_id == eos
    # the last document starts inside the kept sequences only if its first token was kept
    last_start = len(stream) - len(bos_tok.encode(DOCS[-1], add_special_tokens=False))
    assert packed.n_documents == (3 if last_start < n * 4 else 2)


def test_packing_without_bos_follows_the_tokenizer(tmp_path, plain_tok):
    spec = DataSpec(str(write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in DOCS])))
    sep = plain_tok.eos_token_id
    stream = expected_stream(plain_tok, DOCS, sep)
    packed = pack_tokens(spec, plain_tok, 6)
    n = len(stream) // 6
    assert packed.bos_token_id is None and packed.separator_token_id == sep
    assert packed.tokens.tolist() == [stream[i * 6 : (i + 1) * 6] for i in range(n)]


def test_explicit_bos_and_separator_override_the_defaults(tmp_path, bos_tok):
    spec = DataSpec(str(write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in DOCS])))
    pad = bos_tok.convert_tokens_to_ids("<pad>")
    stream = expected_stream(bos_tok, DOCS, pad)
    packed = pack_tokens(spec, bos_tok, 4, prepend_bos=False, separator="<pad>")
    assert packed.bos_token_id is None and packed.separator_token_id == pad
    assert packed.tokens.ravel().tolist() == stream[: packed.tokens.size]
    assert packed.tokens.size == len(stream) // 4 * 4


def test_describe_is_a_json_summary(tmp_path, bos_tok):
    spec = DataSpec(str(write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in DOCS])))
    packed = pack_tokens(spec, bos_tok, 4)
    summary = json.loads(json.dumps(packed.describe()))
    n_seq = packed.tokens.shape[0]
    assert summary == {
        "packing": "packed",
        "n_sequences": n_seq,
        "seq_len": 4,
        "n_tokens": n_seq * 4,
        "n_documents": packed.n_documents,
        "bos_token_id": bos_tok.bos_token_id,
        "separator_token_id": bos_tok.eos_token_id,
        "fingerprint": packed.fingerprint,
    }


def test_fingerprint_is_deterministic_and_tracks_data_and_settings(tmp_path, bos_tok):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in DOCS])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": d.upper()} for d in DOCS])
    first = pack_tokens(DataSpec(str(a)), bos_tok, 4)
    again = pack_tokens(DataSpec(str(a)), bos_tok, 4)
    assert first.fingerprint == again.fingerprint
    assert first.fingerprint.startswith("sha256:") and len(first.fingerprint) == len("sha256:") + 64
    np.testing.assert_array_equal(first.tokens, again.tokens)
    others = {
        pack_tokens(DataSpec(str(b)), bos_tok, 4).fingerprint,
        pack_tokens(DataSpec(str(a)), bos_tok, 5).fingerprint,
        pack_tokens(DataSpec(str(a)), bos_tok, 4, prepend_bos=False).fingerprint,
        pack_tokens(DataSpec(str(a)), bos_tok, 4, separator="<pad>").fingerprint,
    }
    assert first.fingerprint not in others and len(others) == 4


def test_max_tokens_keeps_a_prefix_and_stops_reading_early(tmp_path, monkeypatch, plain_tok):
    pulled = 0
    closed = False

    def endless():
        nonlocal pulled, closed
        try:
            for i in itertools.count():
                pulled += 1
                yield f"Document {i}: the quick brown fox jumps over the lazy dog."
        finally:
            closed = True

    monkeypatch.setitem(text.BUILTINS, "endless", endless)
    packed = pack_tokens(DataSpec("builtin:endless"), plain_tok, 16, 16 * 5 + 7)
    assert packed.tokens.shape == (5, 16)
    assert pulled < 40 and closed
    assert 1 <= packed.n_documents <= pulled

    path = tmp_path / "many.txt"
    path.write_text("".join(f" = Title {i} = \n body {i} text\n" for i in range(300)), encoding="utf-8")
    spec = DataSpec(str(path), doc_regex=r"^ = [^=]")
    full = pack_tokens(spec, plain_tok, 8)
    capped = pack_tokens(spec, plain_tok, 8, 8 * 3)
    np.testing.assert_array_equal(capped.tokens, full.tokens[:3])
    assert capped.n_documents < full.n_documents <= 300


# ---------------------------------------------------------------------------------------------
# The built-in corpus


def test_stdlib_corpus_is_non_empty_deterministic_and_free_of_test_suites(bos_tok):
    root = Path(sysconfig.get_paths()["stdlib"])
    relative = [p.relative_to(root).as_posix() for p in corpus.stdlib_module_paths()]
    assert len(relative) > 100 and relative == sorted(relative)
    for rel in relative:
        assert not set(rel.split("/")) & {"test", "tests", "idle_test", "site-packages", "dist-packages"}, rel
    first = list(itertools.islice(corpus.stdlib_docstrings(), 30))
    assert first == list(itertools.islice(corpus.stdlib_docstrings(), 30))
    assert len(first) == 30 and all(d.strip() for d in first)
    packed = pack_tokens(DataSpec("builtin:stdlib-docstrings"), bos_tok, 64, 64 * 4)
    assert packed.tokens.shape == (4, 64)


def test_module_docstrings_in_source_order_without_importing(tmp_path):
    root = tmp_path / "lib"
    for rel in ["a.py", "pkg/__init__.py", "pkg/test/t.py", "tests/x.py", "idlelib/idle_test/i.py"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text('"""doc"""\n', encoding="utf-8")
    (root / "site-packages").mkdir()
    (root / "site-packages" / "s.py").write_text('"""doc"""\n', encoding="utf-8")
    paths = corpus.stdlib_module_paths(root)
    assert [p.relative_to(root).as_posix() for p in paths] == ["a.py", "pkg/__init__.py"]

    source = (
        '"""Module."""\n'
        "raise SystemExit('never imported')\n"
        "class A:\n"
        '    """Class A."""\n'
        "    def f(self):\n"
        '        """A.f."""\n'
        "if True:\n"
        "    def g():\n"
        '        """g, inside an if."""\n'
        "    def h():\n"
        "        pass\n"
        "try:\n"
        "    pass\n"
        "except ImportError:\n"
        "    async def k():\n"
        '        """k, in a handler."""\n'
    )
    (root / "a.py").write_text(source, encoding="utf-8")
    expected = "Module.\n\nClass A.\n\nA.f.\n\ng, inside an if.\n\nk, in a handler."
    assert corpus.module_docstrings(root / "a.py") == expected
    (root / "bad.py").write_text("def (:\n", encoding="utf-8")
    (root / "nodoc.py").write_text("x = 1\n", encoding="utf-8")
    assert corpus.module_docstrings(root / "bad.py") is None
    assert corpus.module_docstrings(root / "nodoc.py") is None


def test_wikitext_articles(tmp_path, plain_tok):
    """A file laid out as WikiText-2 raw is (` = Title = ` lines, ` = = Section = = ` inside articles,
    blank lines, CRLF endings): the README's doc_regex cuts it into its articles."""
    words = "the fox , a river @-@ bank , 1 @,@ 200 people . ".split()
    lines = []
    for a in range(60):
        lines += ["", f" = Article {a} = ", ""]
        for section in range(3):
            lines += [f" = = Section {section} of {a} = = ", ""]
            lines += [" " + " ".join(words[(a + i) % len(words)] for i in range(120)) + " ", ""]
    path = tmp_path / "wiki.test.raw"
    path.write_bytes("\r\n".join(lines).encode("utf-8"))
    packed = pack_tokens(DataSpec(str(path), doc_regex=r"^ = [^=]"), plain_tok, 256)
    assert packed.n_documents == 60
    assert packed.tokens.shape[0] > 100
