"""`python -m modlm` runs the command line."""

import sys

from modlm.cli import main

sys.exit(main())
