"""The engine: checkpoint I/O, the pass API and registry, recipes, the pipeline, packed formats, transformers glue.

The package is also callable: `bitsmith.compress(recipe, model, output, ...)` is `bitsmith.api.compress`, so the
public function and the subpackage share one name without one hiding the other (`import bitsmith.compress.hub` works).
"""

import sys
import types


class _CallableModule(types.ModuleType):
    def __call__(self, recipe, model, output, **kwargs):
        from ..api import compress

        return compress(recipe, model, output, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
