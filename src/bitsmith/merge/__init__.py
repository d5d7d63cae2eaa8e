"""merge passes."""

from . import soup  # noqa: F401  (registers soup)
