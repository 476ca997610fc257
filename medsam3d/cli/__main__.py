"""``python -m medsam3d.cli``, as ``python -m medsam3d``."""

import sys

from . import main

sys.exit(main())
