"""`python -m pipeline STAGE ...`: the command line (``pipeline.cli``)."""

import sys

from pipeline.cli import main

sys.exit(main())
