"""``python -m appliance`` is the ``appliance`` command."""

from .cli import main

raise SystemExit(main())
