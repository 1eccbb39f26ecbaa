"""The one error type for user mistakes.

Everything a user can get wrong (a file, a flag, a config, a checkpoint) raises
:class:`PlumbError` with a message that says what is wrong and what to do. The CLI
prints it on one line and exits with status 2; library users can catch it.
"""


class PlumbError(ValueError):
    """A mistake in user input: the message names the problem and the fix."""
