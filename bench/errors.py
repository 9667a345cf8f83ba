class UsageError(Exception):
    """An error the user can cause (an unknown name, a bad value, missing data): one message, exit code 2."""


class StoreFailed(Exception):
    """A result could not be stored (a full disk, a folder gone): the grid stops. The message names the cause,
    the cell and the cells left."""
