"""The project's one error base class.

Every error that a user's input can cause (a config field, a path, a data source, a topology, a flag)
derives from `CreamError`, so a CLI reports any of them as one `error: ...` line and exits with status 2,
and a caller of the library can catch them all at once. Each subclass also derives from the built-in
exception it refines (`ValueError`, `RuntimeError`), so code that catches those keeps working.
"""


class CreamError(Exception):
    """A mistake in what the user asked for, with a message that names the value and the fix."""
