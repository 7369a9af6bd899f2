"""``python -m merv``: the ``merv`` command line (:mod:`merv.cli`)."""

import sys

from merv.cli import main

sys.exit(main())
