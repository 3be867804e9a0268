"""The check that a padded store is the build of exactly a given list of prompts, in order.

Analyses that read a prompt's last position (anomaly detection, linear representations) join the
store's sequences to their prompts file by index; this refuses any store for which that join is wrong.
"""

from __future__ import annotations

from lenscache.errors import DataError, LensCacheError
from lenscache.fit.stream import chunk_aligned_blocks
from lenscache.reader import Store


def check_prompt_store(store: Store, texts: list[str], error: type[LensCacheError] = DataError) -> None:
    """Raise `error` unless `store` is padded, has one sequence per text, and each sequence's tokens
    (up to its length) are the stored tokenizer's encoding of its text (with BOS when the build added it)."""
    if not store.padded:
        raise error(
            f"store {store.url} was not built with --packing padded (one prompt per sequence); build it with "
            "`lenscache build --packing padded --data PROMPTS.jsonl`"
        )
    if store.n_sequences != len(texts):
        raise error(
            f"store {store.url} has {store.n_sequences} sequences but the prompts file has {len(texts)} prompts; "
            "build the store from this prompts file (without --max-tokens)"
        )
    tokenizer = store.tokenizer()
    bos = store.meta.data.get("bos_token_id")
    for block in chunk_aligned_blocks(range(len(texts)), store.meta.build.seqs_per_chunk):
        tokens, lengths = store.tokens(block), store.lengths(block)
        encoded = tokenizer([texts[i] for i in block], add_special_tokens=False, return_attention_mask=False)
        for j, i in enumerate(block):
            want = ([int(bos)] if bos is not None else []) + list(encoded["input_ids"][j])
            got = tokens[j, : lengths[j]].tolist()
            if got != want:
                raise error(
                    f"sequence {i} of store {store.url} is not prompt {i} of the prompts file "
                    f"({len(got)} stored tokens, the prompt encodes to {len(want)}; the text begins "
                    f"{texts[i][:40]!r}); build the store from this prompts file"
                )
