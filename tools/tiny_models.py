"""Tiny random models and tokenizers for every supported family, built offline from configs.

Each model is saved as an ordinary Hugging Face directory (config, safetensors, tokenizer) so the
tests, the smoke runs of the tools and tools/crash_torture.py exercise the same loading path users
take with a local model directory. Nothing is downloaded; a model takes about a second to make.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

VOCAB = 384
TRAIN_TEXT = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Residual streams carry the prediction from layer to layer.",
    "Paris is the capital of France; Berlin is the capital of Germany.",
    "def f(x):\n    return x * 2  # a tiny function\n",
    "Numbers 0 1 2 3 4 5 6 7 8 9 and punctuation , . ; : ! ? ( ) [ ] { }",
    "Ünïcödé tëxt, 日本語, emoji 🙂 and tabs\tand newlines\n\n.",
]


def make_tokenizer(out: Path, *, add_bos: bool) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE (every byte sequence encodes) and save it to `out`.

    add_bos=True mimics Llama/Gemma (a BOS token is prepended); False mimics GPT-2/NeoX.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<s>", "</s>", "<pad>"]
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB - 16, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(TRAIN_TEXT * 4, trainer=trainer)
    if add_bos:
        bos_id = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
        )
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
        )
    else:
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<pad>"
        )
    fast.save_pretrained(out)
    return fast


_COMMON = dict(vocab_size=VOCAB, max_position_embeddings=256)

# model_type -> (config overrides, tokenizer adds BOS)
FAMILIES: dict[str, tuple[dict, bool]] = {
    "llama": (
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
        ),
        True,
    ),
    "mistral": (
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
        ),
        True,
    ),
    "qwen2": (
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
        ),
        False,
    ),
    "qwen3": (
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
        ),
        False,
    ),
    "gemma": (
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=16,
        ),
        True,
    ),
    "gemma2": (
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            final_logit_softcapping=30.0,
            attn_logit_softcapping=50.0,
            sliding_window=32,
        ),
        True,
    ),
    "gemma3_text": (
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            sliding_window=32,
        ),
        True,
    ),
    "gpt2": (dict(n_embd=64, n_layer=3, n_head=4, n_positions=256), False),
    "gpt_neox": (
        dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, rotary_pct=0.25
        ),
        False,
    ),
    "opt": (
        dict(hidden_size=64, ffn_dim=128, num_hidden_layers=3, num_attention_heads=4, word_embed_proj_dim=64),
        True,
    ),
    "phi": (
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            partial_rotary_factor=0.5,
        ),
        False,
    ),
    "phi3": (
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
        ),
        False,
    ),
}


def make_tiny_model(out: Path, family: str, *, seed: int = 0, tie: bool | None = None) -> Path:
    """Save a tiny random `family` model with its tokenizer to `out` and return `out`."""
    overrides, add_bos = FAMILIES[family]
    out.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(out, add_bos=add_bos)
    kwargs = dict(_COMMON)
    kwargs.update(overrides)
    kwargs.update(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if tie is not None:
        kwargs["tie_word_embeddings"] = tie
    config = AutoConfig.for_model(family, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    # Random init leaves norms at 1 and biases at 0, which would hide a head that ignores them.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln" in name or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.eval()
    model.save_pretrained(out)
    return out
