"""codefoundry: train code language models from raw source to a usable assistant."""

__version__ = "0.1.0"
