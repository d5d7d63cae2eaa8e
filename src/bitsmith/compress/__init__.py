"""The engine: checkpoint I/O, the pass API and registry, recipes, the pipeline, packed formats, transformers glue."""
