"""``python -m ratiocinator`` is the ``ratiocinator`` command."""

from ratiocinator.cli import main

main()
