"""``python -m ratiocinator`` is the ``ratiocinator`` command."""

from .cli import main

main()
