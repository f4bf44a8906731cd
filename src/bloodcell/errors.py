"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class BloodcellError(Exception):
    """A problem the user can fix (bad file, bad option); shown without a traceback."""
