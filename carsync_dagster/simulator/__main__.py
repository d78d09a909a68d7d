"""`python -m carsync_dagster.simulator`: serve the simulated source API in the foreground."""

from .server import main

raise SystemExit(main())
