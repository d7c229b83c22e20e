"""`python -m adatoken ...` runs the `adatoken` command."""
import sys

from adatoken.cli import main

sys.exit(main())
