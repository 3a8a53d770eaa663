"""`python -m benchmarks.sim ...` runs `fulcrum sim`."""

from benchmarks.sim.cli import main

raise SystemExit(main())
