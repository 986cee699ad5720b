"""cnn-mlops pipeline: the DVC stages and CLIs (``python -m pipeline.<command>``) over ``common`` and ``lib``."""
