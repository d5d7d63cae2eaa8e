"""prune passes."""
