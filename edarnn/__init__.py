"""edarnn: recurrent-memory token mixers (EDA, GDN-2 and the delta-rule family) in JAX."""

from edarnn import rules

__version__ = "0.1.0"
__all__ = ["rules"]
