"""``python -m sparsebp``: the same as the ``sparsebp`` command."""
import sys

from sparsebp.cli import main

sys.exit(main())
