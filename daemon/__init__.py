"""postbackd: delivers affiliate-marketing postbacks from rules kept in git."""

__version__ = "0.1.0"
