"""Test-only crash points: `CLIPDEX_TEST_CRASH_AT=<name>` kills the process (SIGKILL) there.

The reliability tests use them to prove that a crash at the worst moment (between the store
commit and the index publish, in the middle of an index write) loses nothing. Unset, a crash
point costs one environment lookup.
"""

from __future__ import annotations

import os
import signal

CRASH_AT = "CLIPDEX_TEST_CRASH_AT"
# Where run_build / save_index call crash_point(); the tests name these.
POINTS = ("after_store_commit", "during_index_write", "before_index_pointer")


def crash_point(name: str) -> None:
    """Die like `kill -9` would if the crash hook names this point (no cleanup, no flush)."""
    if os.environ.get(CRASH_AT) == name:
        os.kill(os.getpid(), signal.SIGKILL)
