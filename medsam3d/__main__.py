"""``python -m medsam3d`` (used by the Slicer extension's runner)."""

import sys

from .cli import main

sys.exit(main())
