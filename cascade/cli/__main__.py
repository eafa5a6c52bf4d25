"""`python -m cascade.cli ...`: how `cascade up` starts its children without an installed script."""

from cascade.cli import main

raise SystemExit(main())
