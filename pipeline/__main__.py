"""``python -m pipeline``: the command line (see :mod:`pipeline._cli`)."""

from pipeline._cli import main

raise SystemExit(main())
