"""One offline switch for the process: with `HF_HUB_OFFLINE=1`, or once a download has failed,
nothing in this process tries the network again.

Without it, a machine with no network pays a connection timeout at every load that could reach
out: the AlexNet weights LPIPS asks torchvision for, and each file of each encoder given by Hub id.
`go_offline` turns huggingface_hub's own offline mode on (and so transformers' and diffusers'),
so later Hub loads read the local cache at once or fail saying the files are not cached.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket

from huggingface_hub import constants

logger = logging.getLogger(__name__)

NETWORK_TIMEOUT = 15.0  # seconds one connection attempt may take before it counts as failed

_failure: str | None = None  # why this process went offline, once it has


def _env_says_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in constants.ENV_VARS_TRUE_VALUES


def is_offline() -> bool:
    """True when `HF_HUB_OFFLINE` is set or a download in this process has already failed."""
    return _failure is not None or constants.HF_HUB_OFFLINE or _env_says_offline()


def go_offline(reason: str) -> None:
    """After a failed attempt: the rest of the process runs as with `HF_HUB_OFFLINE=1`."""
    global _failure
    if _failure is None:
        logger.warning("the network is unreachable (%s); this process will not try it again", reason)
    _failure = reason
    constants.HF_HUB_OFFLINE = True
    os.environ["HF_HUB_OFFLINE"] = "1"


@contextlib.contextmanager
def network_attempt(what: str):
    """One bounded try at the network (`NETWORK_TIMEOUT` per connection); a connection error
    switches the process offline and is raised again for the caller to report."""
    before = socket.getdefaulttimeout()
    socket.setdefaulttimeout(NETWORK_TIMEOUT)
    try:
        yield
    except OSError as err:  # URLError, socket.timeout, ConnectionError: all OSErrors
        go_offline(f"{what}: {err}")
        raise
    finally:
        socket.setdefaulttimeout(before)


def check_hub_reachable(names: list[str]) -> None:
    """Before loading models by Hub id (`names` that are not local folders): one request to the Hub;
    when it fails, the process goes offline and the loads read the local cache only."""
    if is_offline() or all(os.path.exists(n) for n in names):
        return
    from huggingface_hub.utils import get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=NETWORK_TIMEOUT)
    except Exception as err:  # the HTTP client's own errors are not OSErrors
        go_offline(f"the Hugging Face Hub at {constants.ENDPOINT}: {err}")
