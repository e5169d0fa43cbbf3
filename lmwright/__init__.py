"""lmwright: from raw text to a trained, aligned and served language model.

``import lmwright`` stays light: heavy libraries are imported by the functions that need them.
"""

__version__ = "0.1.0"


def load(path, **kwargs):
    """Load a run, checkpoint or model folder for inference: ``lmwright.load("runs/x").generate("Hi")``."""
    from lmwright.serve.api import load as _load

    return _load(path, **kwargs)


__all__ = ["__version__", "load"]
