"""``python -m valmi_sidecar``: the same as the ``valmi-sidecar`` command."""

from .cli import main

raise SystemExit(main())
