"""steerable: few-shot steerable alignment with Neural Processes (NP-BTL, NP-DPO)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("steerable")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"
