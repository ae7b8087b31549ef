"""Fetching model files: verified, resumable downloads and the on-disk model store.

``ModelStore`` is the entry point (``ensure(selection)`` → local path); ``Downloader``
does one verified transfer; progress events and the terminal bar live in ``progress``.
"""

from agent.fetch.downloader import Downloader
from agent.fetch.progress import ProgressReporter, TerminalProgressBar
from agent.fetch.store import ModelStore, StoredModel

__all__ = ["Downloader", "ModelStore", "ProgressReporter", "StoredModel", "TerminalProgressBar"]
