"""`python -m cnntrain` runs the command line."""

from .cli import main

main()
