"""``python -m anomalox``: the command line (see ``anomalox.cli``)."""

import sys

from anomalox.cli import main

sys.exit(main())
