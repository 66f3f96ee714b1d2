"""`python -m nf4`: the same as the `nf4` command."""

import sys

from nf4.cli import main

sys.exit(main())
