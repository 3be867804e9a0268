"""The tests' tiny random models: the package's own maker (lenscache.tools.tiny_models), re-exported
under the name the tests import (`from tiny_models import ...`)."""

from lenscache.tools.tiny_models import FAMILIES, TRAIN_TEXT, VOCAB, make_tiny_model, make_tokenizer

__all__ = ["FAMILIES", "TRAIN_TEXT", "VOCAB", "make_tiny_model", "make_tokenizer"]
