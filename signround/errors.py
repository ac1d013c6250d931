"""User-facing errors.

Every problem a user can fix (bad option, bad file, bad data) is raised as :class:`SignRoundError`
with a one-line message that says what to do next. The CLI turns it into ``signround: error: ...``
and exit code 2; library users get an ordinary ``ValueError`` subclass.
"""

from __future__ import annotations


class SignRoundError(ValueError):
    """A problem with the user's input; the message is one line and names the fix."""
