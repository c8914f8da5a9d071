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
