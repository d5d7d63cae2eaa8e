"""tokenizers passes."""

from . import transplant  # noqa: F401  (registers transplant_tokenizer)
