"""tokenizers passes."""
