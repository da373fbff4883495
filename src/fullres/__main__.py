"""`python -m fullres ...` (what torchrun runs) is the `fullres` command."""

import sys

from fullres.cli import main

sys.exit(main())
