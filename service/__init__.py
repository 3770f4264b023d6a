"""dreamgate: the gateway and the domain its workers share."""

from importlib.metadata import PackageNotFoundError, version

try:
    # The one place the version is written is pyproject.toml; everything reads it from here.
    __version__ = version("dreamgate")
except PackageNotFoundError:  # imported from a checkout that was never installed
    __version__ = "0+unknown"
