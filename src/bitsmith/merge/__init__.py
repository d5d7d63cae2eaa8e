"""merge passes."""
