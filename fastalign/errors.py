"""User-facing errors: each names what is wrong (file, record, flag, weight) and why.

Command-line entry points catch `FastalignError` and print its message without a traceback
(see `fastalign.cli.run_main`); anything else is a bug and keeps its traceback.
"""


class FastalignError(Exception):
    """An error caused by the user's input or environment, with a message that says how."""

    label = "error"  # run_main prints "<label>: <message>" and exits with exit_code
    exit_code = 2


class DataError(FastalignError):
    """A data file or record that cannot be used (names the file, record index, field, reason)."""


class ModelError(FastalignError):
    """A model directory, config or weight set that fastalign cannot load or represent."""


class ConfigError(FastalignError):
    """A command-line flag or option value that is invalid (names the flag)."""


def brief_list(items: list[str], limit: int = 8) -> str:
    """A readable list for a message: the first `limit` items and how many more ("none" if empty)."""
    if not items:
        return "none"
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more
