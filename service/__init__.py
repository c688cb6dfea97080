"""apptgate: a gRPC gateway giving partner software minimal-disclosure views of appointments."""

#: The release, declared here only: the package metadata (pyproject.toml) and ``--version`` read it.
__version__ = "0.2.0"
