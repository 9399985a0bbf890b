"""`python -m symphony ...` runs the `symphony` command (what `torchrun -m symphony` needs)."""
import sys

from symphony.cli import main

sys.exit(main())
