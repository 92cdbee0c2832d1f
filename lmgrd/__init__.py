"""lmgrd: the license server daemon and its admin tools. Depends on ``protocol``; never on ``client_stub``."""

__version__ = "0.1.0"


class LmgrdError(Exception):
    """Root of the daemon's own errors (configuration, licenses, state). ``cli`` turns them into exit codes."""
