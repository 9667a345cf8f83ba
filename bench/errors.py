class UsageError(Exception):
    """An error the user can cause (an unknown name, a bad value, missing data): one message, exit code 2."""
