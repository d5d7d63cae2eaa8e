"""User-facing errors.

Every mistake a user can make (bad recipe, bad checkpoint, bad flag) raises a `BitsmithError`. The CLI prints its
message alone (no traceback) and exits with status 2. Bugs stay ordinary exceptions.
"""


class BitsmithError(Exception):
    """A user error: the message says what is wrong, where, and what is allowed."""

    exit_code = 2


class RecipeError(BitsmithError):
    """The recipe itself is malformed: YAML syntax, unknown pass, unknown or mistyped key."""


class CheckpointError(BitsmithError):
    """The checkpoint folder (or a file in it) is missing, corrupt or contradicts its config."""


class PlanError(BitsmithError):
    """The recipe is well-formed but does not fit this checkpoint (targets, shapes, pass order)."""


class OutputError(BitsmithError):
    """The output folder cannot be written (exists, unwritable, disk full)."""
