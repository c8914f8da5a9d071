"""``python -m laplace_ggn.cli``: the ``laplace-ggn`` command."""

import sys

from . import main

sys.exit(main())
