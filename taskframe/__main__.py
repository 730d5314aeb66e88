"""``python -m taskframe``: the same CLI as the ``taskframe`` command."""

from .cli import main

raise SystemExit(main())
