"""Integrations with model libraries (transformers) and the bundled real model (SmolLM2-135M-Instruct).

Submodules are imported on demand so that `import elastic_cuda` stays free of transformers."""
