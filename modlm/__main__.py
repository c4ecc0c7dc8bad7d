"""`python -m modlm` runs the command line."""

import sys

try:
    from modlm.cli import main
except KeyboardInterrupt:     # Ctrl-C while the command line itself loads
    print("modlm: interrupted", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
