"""The errors every stage raises for bad input, in a leaf module that imports nothing.

``common.run_stage`` turns each into one line on stderr and exit status 2. Kept apart so that a
stage that only raises or catches them does not import (and list in its DVC deps) the module
that detects them.
"""


class ParamsError(ValueError):
    """A value in params.yaml is missing, misspelled, of the wrong type or out of range."""


class DataError(ValueError):
    """An input file is missing or malformed; the message says where."""


class StageError(RuntimeError):
    """A stage cannot go on; the message says why and what to do."""
