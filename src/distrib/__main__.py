"""``python -m distrib ...`` is the ``distrib`` console script."""

from distrib.cli import main

raise SystemExit(main())
