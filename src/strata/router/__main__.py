"""`python -m strata.router ...` == `strata router ...` (without going through the top-level CLI)."""
import sys

from strata.router.cli import main

sys.exit(main())
