"""Triton kernels, one file per packed format, each with its torch reference; and the nn.Module replacements."""
