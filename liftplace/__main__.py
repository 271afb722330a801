"""``python -m liftplace`` runs the ``liftplace`` command line."""

import sys

from .cli import main

sys.exit(main())
