"""slimkit: make neural networks smaller and faster, one verb at a time."""
from .config import QuantConfig
from .errors import SlimkitError
from .quantize import quantize

__version__ = "0.1.0"
__all__ = ["quantize", "QuantConfig", "SlimkitError", "__version__"]
