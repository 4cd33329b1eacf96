"""Entry point for `python -m cascade_core`."""

import sys

from cascade_core.cli import main

sys.exit(main())
