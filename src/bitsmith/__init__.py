"""bitsmith: post-training compression for Hugging Face checkpoints.

    bitsmith.compress("int8", "path/to/model", "out/")          # a recipe (bundled name or YAML path) over a folder
    bitsmith.apply(model, [bitsmith.FineQuant(bits=4)])         # pass configs on an in-memory model
    model = bitsmith.load("out/")                               # or AutoModelForCausalLM.from_pretrained("out/")
"""

__version__ = "0.1.0"

# `bitsmith.compress` is the engine subpackage, and calling it runs `api.compress` (see compress/__init__.py).
# Nothing here imports pydantic, so the kernels and the loader work in environments that only have
# torch/triton/transformers (pass configs are imported on first use).
from . import compress  # noqa: E402
from .api import apply, load, load_tokenizer  # noqa: E402
from .compress.hf_integration import register as _register_transformers  # noqa: E402

_register_transformers()

__all__ = ["__version__", "compress", "apply", "load", "load_tokenizer", "FineQuant"]

_LAZY = {"FineQuant": ("bitsmith.quant.finequant", "FineQuant")}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'bitsmith' has no attribute {name!r}")
