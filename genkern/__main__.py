"""`python -m genkern <command>` (and `torchrun -m genkern <command>`)."""

import sys

from genkern.cli import main

sys.exit(main())
