"""``python -m ember.cli``."""

from ember.cli import main

main()
