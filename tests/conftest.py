"""No test may reach the internet: downloads are off in subprocesses and limited to 127.0.0.1 here.

tests/test_download.py turns downloads back on where it wants them, against its own server.
"""

import pytest

from cnntrain.data import download


@pytest.fixture(autouse=True)
def no_internet(monkeypatch):
    # Subprocesses (the CLI run as a user runs it) inherit this and never download.
    monkeypatch.setenv("CNNTRAIN_OFFLINE", "1")
    monkeypatch.delenv("CNNTRAIN_MIRROR", raising=False)
    # In this process, a URL for any other host fails as a try without being contacted.
    monkeypatch.setattr(download, "ALLOWED_HOSTS", {"127.0.0.1"})
