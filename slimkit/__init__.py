"""slimkit: make neural networks smaller and faster, one verb at a time."""
from .config import QuantConfig
from .errors import SlimkitError
from .eval import evaluate
from .io.artifact import load, save
from .quantize import quantize
from .sparsify import sparsify

__version__ = "0.1.0"
__all__ = ["quantize", "sparsify", "save", "load", "evaluate", "QuantConfig", "SlimkitError", "__version__"]
