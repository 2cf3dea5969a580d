"""`python -m apprentice_cli …`: the `apprentice` console script without installing it."""
import sys

from . import main

sys.exit(main())
