"""`python -m gsrv` is the `gsrv` command."""

from gsrv.cli import main

raise SystemExit(main())
