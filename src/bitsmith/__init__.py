"""bitsmith: post-training compression for Hugging Face checkpoints.

    bitsmith.compress("int8", "path/to/model", "out/")          # a recipe (bundled name or YAML path) over a folder
    bitsmith.apply(model, [bitsmith.FineQuant(bits=4)])         # pass configs on an in-memory model
    model = bitsmith.load("out/")                               # or AutoModelForCausalLM.from_pretrained("out/")
"""

__version__ = "0.1.0"

from .api import apply, compress, load  # noqa: E402
from .quant.finequant import FineQuant  # noqa: E402

__all__ = ["__version__", "compress", "apply", "load", "FineQuant"]


def _register_transformers() -> None:
    try:
        from .compress.hf_integration import register
    except ImportError:  # transformers integration being built; plain loading still works
        return
    register()


_register_transformers()
