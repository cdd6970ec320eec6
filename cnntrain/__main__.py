"""`python -m cnntrain` runs the command line."""

from .cli import app

app(prog_name="cnntrain")
