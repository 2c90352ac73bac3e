"""The one exception type for mistakes a user can make (bad input, missing weights, ...).

The napari widgets show it as a notification and the CLI prints it on one line; anything
else that escapes is a bug.
"""


class StegoError(Exception):
    """A problem the user can fix; the message says how."""


class Cancelled(Exception):
    """Long work stopped because the user asked (the ``cancel`` event was set)."""
