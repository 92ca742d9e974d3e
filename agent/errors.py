"""The two kinds of failure the command line tells apart (DESIGN §3 exit codes)."""


class LeptonError(Exception):
    """A runtime failure: exit code 1."""


class BadInput(LeptonError):
    """Bad input or bad configuration: exit code 2, one line naming the file or field."""
