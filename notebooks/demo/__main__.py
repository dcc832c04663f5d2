"""``python -m notebooks.demo``, from the checkout's root: see ``cli``."""

from .cli import main

main()
