"""Fetching model files: verified, resumable downloads and the on-disk model store.

``ModelStore`` is the entry point (``ensure(selection)`` → local path); its index is
``store_index``, eviction by budget and free space ``store_space``. ``Downloader`` does one
verified transfer: its mirror and retry policy sits over ``transfer`` (one Range GET),
``part`` (the hashed ``.part`` file) and ``http`` (the one HTTP client); a file already on
this machine goes through ``local_copy``. ``store_files`` opens, locks and hashes the store's
files safely, ``disk_space`` checks free space; progress events and the terminal bar live in
``progress``.
"""

from agent.fetch.downloader import Downloader
from agent.fetch.progress import ProgressReporter, TerminalProgressBar
from agent.fetch.store import ModelStore, StoredModel

__all__ = ["Downloader", "ModelStore", "ProgressReporter", "StoredModel", "TerminalProgressBar"]
