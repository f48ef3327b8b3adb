"""`python -m fasttrain ...`, the same as the `fasttrain` command; what torchrun starts: `torchrun ... -m fasttrain`."""

import sys

from fasttrain.cli import main

sys.exit(main())
