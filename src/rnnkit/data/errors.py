"""The one error a bad data file raises."""


class DataError(ValueError):
    """A data file is missing, truncated or not what the task expects; the message says which."""
