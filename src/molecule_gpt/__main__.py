"""`python -m molecule_gpt` is the `molecule-gpt` command."""
import sys

from .cli import main

sys.exit(main())
