"""Concepts given as word pairs: loading and checking pair files, their tokens, and prompts for them.

A pair file is a JSON list of ``[base, counterfactual]`` pairs (the documented format), or a list of
``{"input": base, "output": counterfactual}`` objects (the shape of the shared concept-pair files).
The concept's name is the file's stem.

Which token is a word: the token the model predicts when the word comes next after a space, i.e.
the tokens of ``"The" + " " + word`` that follow those of ``"The"``. For byte-level BPE tokenizers
(GPT-2, SmolLM2, Llama 3) that is the encoding of ``" " + word``; for SentencePiece ones it is the
``"▁word"`` piece. A pair is usable when both words are one token that way and the two tokens
differ; every other pair is skipped with its reason (reported, never silently dropped). A concept
needs at least `MIN_PAIRS` usable pairs.

For the residual side (`prompts`), each concept has templates: a context whose next word is the
base word (label 0) and one whose next word is the counterfactual (label 1), each mentioning the
pair's other word so that the next word is this pair's, e.g. for present-past
``"Today they {base}. Yesterday they"`` -> `` {cf}``. The prompts file is JSONL with fields
text, label, concept, pair (the pair's index in its file) and target (the expected next word); it
is built like any data with ``lenscache build --packing padded --data prompts.jsonl``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lenscache.errors import DataError

MIN_PAIRS = 3  # fewer usable pairs give no leave-one-out mean direction worth the name
CONTEXT = "The"  # what a word follows when its token is looked up (see the module docstring)


class ConceptError(DataError):
    """A pair file is malformed, or a concept has too few usable pairs."""


@dataclass
class ConceptPairs:
    """One concept: its word pairs as given, and the usable ones as token ids."""

    name: str
    pairs: list[tuple[str, str]]  # every pair in the file, in order
    usable: list[int] = field(default_factory=list)  # indices into `pairs` of the usable pairs
    ids: list[tuple[int, int]] = field(default_factory=list)  # (base id, counterfactual id) per usable pair
    skipped: list[dict[str, Any]] = field(default_factory=list)  # {pair, base, counterfactual, reason}

    @property
    def n_usable(self) -> int:
        return len(self.usable)

    def id_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """int64 base ids and counterfactual ids of the usable pairs."""
        arr = np.asarray(self.ids, dtype=np.int64).reshape(-1, 2)
        return arr[:, 0], arr[:, 1]

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "n_pairs": len(self.pairs),
            "n_usable": self.n_usable,
            "n_skipped": len(self.skipped),
        }


# ---- pair files ----------------------------------------------------------------------------------


def parse_pairs(raw: Any, source: str) -> list[tuple[str, str]]:
    """Pairs from parsed JSON: a list of [base, counterfactual] or of {"input", "output"} objects."""
    what = (
        f"{source}: expected a JSON list of [base, counterfactual] pairs "
        '(or of {"input": base, "output": counterfactual} objects)'
    )
    if not isinstance(raw, list):
        raise ConceptError(f"{what}, got a JSON {type(raw).__name__}")
    if not raw:
        raise ConceptError(f"{what}, got an empty list")
    pairs: list[tuple[str, str]] = []
    for i, item in enumerate(raw):
        if isinstance(item, dict) and set(item) >= {"input", "output"}:
            base, cf = item["input"], item["output"]
        elif isinstance(item, list | tuple) and len(item) == 2:
            base, cf = item
        else:
            raise ConceptError(f"{what}; item {i} is {json.dumps(item)[:80]}")
        if not (isinstance(base, str) and isinstance(cf, str)) or not base.strip() or not cf.strip():
            raise ConceptError(f"{what}; item {i} does not hold two non-empty strings: {json.dumps(item)[:80]}")
        pairs.append((base.strip(), cf.strip()))
    return pairs


def load_pairs(path: str | os.PathLike) -> tuple[str, list[tuple[str, str]]]:
    """(concept name = file stem, pairs) of a pair file."""
    where = Path(path)
    try:
        raw = json.loads(where.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConceptError(f"pair file {where} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConceptError(f"cannot read pair file {where}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ConceptError(f"pair file {where} is not valid JSON: {exc}") from None
    return where.stem, parse_pairs(raw, str(where))


def word_token(tokenizer: Any, word: str) -> list[int]:
    """The token ids of `word` as the next word after a space (see the module docstring)."""
    head = tokenizer.encode(CONTEXT, add_special_tokens=False)
    both = tokenizer.encode(f"{CONTEXT} {word}", add_special_tokens=False)
    if both[: len(head)] != head:  # the context merged into the word: no clean split
        return tokenizer.encode(f" {word}", add_special_tokens=False)
    return both[len(head) :]


def tokenize_concept(
    name: str, pairs: list[tuple[str, str]], tokenizer: Any, *, min_pairs: int = MIN_PAIRS
) -> ConceptPairs:
    """The usable pairs of a concept as token ids; raises ConceptError below `min_pairs` usable pairs."""
    concept = ConceptPairs(name, list(pairs))
    for i, (base, cf) in enumerate(pairs):
        b, c = word_token(tokenizer, base), word_token(tokenizer, cf)
        reason = None
        if len(b) != 1 or len(c) != 1:
            parts = [f"{w!r} is {len(t)} tokens" for w, t in ((base, b), (cf, c)) if len(t) != 1]
            reason = "; ".join(parts)
        elif b[0] == c[0]:
            reason = "both words are the same token"
        if reason is None:
            concept.usable.append(i)
            concept.ids.append((int(b[0]), int(c[0])))
        else:
            concept.skipped.append({"pair": i, "base": base, "counterfactual": cf, "reason": reason})
    if concept.n_usable < min_pairs:
        raise ConceptError(
            f"concept {name!r} has {concept.n_usable} usable pairs of {len(pairs)} (both words one token each, "
            f"as the next word after a space), fewer than the {min_pairs} needed"
        )
    return concept


def load_concepts(paths: Iterable[str | os.PathLike], tokenizer: Any) -> list[ConceptPairs]:
    """Every pair file as a tokenized concept; concept names (file stems) must be distinct."""
    concepts: list[ConceptPairs] = []
    for path in paths:
        name, pairs = load_pairs(path)
        if any(c.name == name for c in concepts):
            raise ConceptError(f"two pair files name the concept {name!r} (concept name = file stem)")
        concepts.append(tokenize_concept(name, pairs, tokenizer))
    if not concepts:
        raise ConceptError("no pair file given (--pairs)")
    return concepts


# ---- prompts -----------------------------------------------------------------------------------

# (context whose next word is the base, context whose next word is the counterfactual); {base} and
# {cf} are the pair's words. A template never mentions the word it predicts; a fixed demonstration
# (water/eau, Paris/France, ...) shows the task to small models.
TEMPLATES: dict[str, list[tuple[str, str]]] = {
    "present-past": [
        ("Yesterday they {cf}. Today they", "Today they {base}. Yesterday they"),
        ("Yesterday I walked, today I walk. Yesterday I {cf}, today I",
         "Today I walk, yesterday I walked. Today I {base}, yesterday I"),
    ],
    "singular-plural": [
        ("Many {cf}, but only one", "Only one {base}, but many"),
        ("two cats, one cat; two {cf}, one", "one cat, two cats; one {base}, two"),
    ],
    "capitalize": [
        ("Apple in lowercase is apple. {cf} in lowercase is", "apple capitalized is Apple. {base} capitalized is"),
        ("Apple -> apple, {cf} ->", "apple -> Apple, {base} ->"),
    ],
    "country-capital": [
        ("Paris is the capital of France. {cf} is the capital of",
         "The capital of France is Paris. The capital of {base} is"),
        ("Capital: Paris. Country: France. Capital: {cf}. Country:",
         "Country: France. Capital: Paris. Country: {base}. Capital:"),
    ],
    "antonym": [  # symmetric: which word is the base is the pair file's choice
        ("The opposite of hot is cold. The opposite of {cf} is", "The opposite of hot is cold. The opposite of {base} is"),
        ("big - small, {cf} -", "big - small, {base} -"),
    ],
}
for _lang, _water in (("French", "eau"), ("German", "Wasser"), ("Spanish", "agua")):
    TEMPLATES[f"english-{_lang.lower()}"] = [
        (f"{_lang}: {_water}. English: water. {_lang}: {{cf}}. English:",
         f"English: water. {_lang}: {_water}. English: {{base}}. {_lang}:"),
        (f"The English word for {_water} is water. The English word for {{cf}} is",
         f"The {_lang} word for water is {_water}. The {_lang} word for {{base}} is"),
    ]  # fmt: skip
GENERIC = [("Counterpart: {cf}. Word:", "Word: {base}. Counterpart:")]


def templates(concept: str) -> list[tuple[str, str]]:
    """The templates of a concept name; concepts without their own get the generic ones."""
    return TEMPLATES.get(concept, GENERIC)


def prompts(concept: ConceptPairs, max_pairs: int | None = None, seed: int = 0) -> list[tuple[str, int, int]]:
    """(text, label, pair index) for the usable pairs: label 0 predicts the base, 1 the counterfactual.

    max_pairs: a seeded random subset of the usable pairs (kept in file order).
    """
    chosen = list(concept.usable)
    if max_pairs is not None and len(chosen) > max_pairs:
        rng = np.random.default_rng([seed, len(chosen)])
        chosen = sorted(rng.choice(chosen, size=max_pairs, replace=False).tolist())
    out: list[tuple[str, int, int]] = []
    for i in chosen:
        base, cf = concept.pairs[i]
        for t0, t1 in templates(concept.name):
            out.append((t0.format(base=base, cf=cf), 0, i))
            out.append((t1.format(base=base, cf=cf), 1, i))
    return out


def write_prompts(
    path: str | os.PathLike, concepts: list[ConceptPairs], max_pairs: int | None = None, seed: int = 0
) -> int:
    """Write the prompts JSONL (text, label, concept, pair, target) atomically; returns the row count."""
    where = Path(path)
    tmp = where.with_name(f".{where.name}.tmp-{os.getpid()}")
    n = 0
    try:
        with tmp.open("w", encoding="utf-8") as f:
            for concept in concepts:
                for text, label, pair in prompts(concept, max_pairs, seed):
                    target = concept.pairs[pair][label]
                    row = {"text": text, "label": label, "concept": concept.name, "pair": pair, "target": target}
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
                    n += 1
        os.replace(tmp, where)
    finally:
        tmp.unlink(missing_ok=True)
    return n


@dataclass(frozen=True)
class PromptRow:
    text: str
    label: int
    concept: str
    pair: int


def read_prompts(path: str | os.PathLike) -> list[PromptRow]:
    """The rows of a prompts file written by `write_prompts` (same order as the store's sequences)."""
    where = Path(path)
    rows: list[PromptRow] = []
    try:
        lines = where.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ConceptError(f"prompts file {where} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConceptError(f"cannot read prompts file {where}: {exc}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            item = PromptRow(str(row["text"]), int(row["label"]), str(row["concept"]), int(row["pair"]))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise ConceptError(
                f"{where} line {number}: not a prompts row (text, label, concept, pair): {exc}"
            ) from None
        if item.label not in (0, 1) or not item.text.strip():
            raise ConceptError(f"{where} line {number}: label must be 0 or 1 and text non-blank")
        rows.append(item)
    if not rows:
        raise ConceptError(f"prompts file {where} holds no rows")
    return rows
