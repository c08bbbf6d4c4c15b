"""`python -m dng`: the `dng` command (so that torchrun -m dng and accelerate launch -m dng can start it)."""

import sys

from dng.cli import main

sys.exit(main())
