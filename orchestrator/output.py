"""How views print: rich tables whole, and ``--json`` documents a script can read.

A table on a terminal takes the terminal's width; piped or redirected it is never cut to
rich's default of 80 columns (a script's ``grep`` must see every cell). ``--json`` prints
one JSON document and a newline; each command's ``--help`` names its fields, and
tests/unit/test_json_views.py holds them to it.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

#: Wide enough for any row m2d prints; rich sizes a table to its content below this.
_PIPED_WIDTH = 10_000


def print_table(table: Any) -> None:
    """``table`` (a rich Table) on stdout, whole."""
    from rich.console import Console

    Console(file=sys.stdout, width=None if sys.stdout.isatty() else _PIPED_WIDTH).print(table)


def print_json(document: Any) -> None:
    """``document`` as one line of JSON and a newline."""
    click.echo(json.dumps(document))
