import matplotlib

matplotlib.use("Agg")

import pytest
import torch
from cases import CASE_NAMES, make_case

torch.set_num_threads(1)


@pytest.fixture(
    params=[(n, s) for n in CASE_NAMES for s in (0, 1)], ids=lambda p: f"{p[0]}-s{p[1]}"
)
def case(request):
    name, seed = request.param
    return make_case(name, seed)


@pytest.fixture(autouse=True)
def _structure_registry_kept():
    """Tests may add, replace or remove structures; the registry returns as it was, in order."""
    from laplace_ggn.structures import STRUCTURES

    saved = dict(STRUCTURES)
    yield
    if list(STRUCTURES.items()) != list(saved.items()):
        STRUCTURES.clear()
        STRUCTURES.update(saved)
