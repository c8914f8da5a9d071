"""Function-space Laplace: the GP of the linearised network (``structure="gp"``) and ELLA.

``gp`` keeps the GGN square-root rows of M context samples (a uniform random subset, or
every sample: then it is exact); ``ella`` keeps K Nyström features of the kernel and the
GGN of every sample projected on them.  Importing the package registers both structures;
``docs/gp.md`` describes them.
"""

from .context import GPContextCollector, gp_memory_bytes
from .ella import EllaCollector, ella_memory_bytes
from .gp_posterior import GPPosterior
from .posterior import EllaPosterior
from .registry import ELLA_SPEC, GP_SPEC

__all__ = [
    "ELLA_SPEC",
    "EllaCollector",
    "EllaPosterior",
    "GPContextCollector",
    "GPPosterior",
    "GP_SPEC",
    "ella_memory_bytes",
    "gp_memory_bytes",
]
