"""The base of errors a user's input causes (a config, a data file, a record, a base directory): the console
scripts print their message and exit 2 instead of a traceback (`vir.utils.config.cli_entry`)."""

from __future__ import annotations


class UserError(ValueError):
    """Something the user wrote or pointed at is wrong; the message names the key, path or record, and what
    to do."""
