"""Router training (data, losses, trainer, evaluation, CLI commands) for Elastic Attention.

Import the submodules directly (``elastic_cuda.training.data`` etc.); this package imports nothing eagerly so
that building data does not load the model-side modules.
"""
