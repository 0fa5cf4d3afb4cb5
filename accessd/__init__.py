"""accessd: the access layer of a data platform, as one Trio daemon."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("accessd")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0"
