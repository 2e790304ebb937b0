"""``python -m tprop`` (and ``torchrun -m tprop``) run the command line."""

import sys

from .cli import main

sys.exit(main())
