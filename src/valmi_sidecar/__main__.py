"""``python -m valmi_sidecar``: the same as the ``valmi-sidecar`` command."""

from .entry import main

raise SystemExit(main())
