"""Bundled recipes (YAML), addressable by name: `bitsmith recipes list`."""
