"""`python -m adatoken.cli ...` (what torchrun's -m needs) runs the `adatoken` command."""
import sys

from adatoken.cli import main

sys.exit(main())
