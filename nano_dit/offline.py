"""Offline-safe network use: with `HF_HUB_OFFLINE=1` nothing in the process reaches out, and once a
download from a host has failed, nothing in the process tries that host again.

Without it, a machine with no network pays a connection timeout at every load that could reach
out: the AlexNet weights LPIPS asks torchvision for, and each file of each encoder given by Hub id.
A failed request to the Hub turns on huggingface_hub's own offline mode (and so transformers' and
diffusers'), so later Hub loads read the local cache at once or fail saying the files are not
cached. A failed AlexNet download marks only its host: a run that cannot reach PyTorch's download
server may still push to the Hub at its end.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket

from huggingface_hub import constants

logger = logging.getLogger(__name__)

NETWORK_TIMEOUT = 15.0  # seconds one connection attempt may take before it counts as failed

_unreachable: dict[str, str] = {}  # host -> why it failed, for the rest of the process


def is_offline() -> bool:
    """True when `HF_HUB_OFFLINE` is set (by the user, or after the Hub could not be reached)."""
    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in constants.ENV_VARS_TRUE_VALUES


def unreachable(host: str) -> bool:
    """True when the process is offline or a download from `host` has already failed."""
    return is_offline() or host in _unreachable


def mark_unreachable(host: str, reason: str) -> None:
    """After a failed attempt: `host` is not tried again; the Hub's failure makes the process
    run as with `HF_HUB_OFFLINE=1`."""
    if host not in _unreachable:
        logger.warning("%s is unreachable (%s); this process will not try it again", host, reason)
    _unreachable[host] = reason
    if host == hub_host():
        constants.HF_HUB_OFFLINE = True
        os.environ["HF_HUB_OFFLINE"] = "1"


def hub_host() -> str:
    return constants.ENDPOINT


@contextlib.contextmanager
def network_attempt(host: str):
    """One bounded try at `host` (`NETWORK_TIMEOUT` per connection); a connection error marks it
    unreachable and is raised again for the caller to report."""
    before = socket.getdefaulttimeout()
    socket.setdefaulttimeout(NETWORK_TIMEOUT)
    try:
        yield
    except OSError as err:  # URLError, socket.timeout, ConnectionError: all OSErrors
        mark_unreachable(host, str(err))
        raise
    finally:
        socket.setdefaulttimeout(before)


def check_hub_reachable(names: list[str]) -> None:
    """Before loading models by Hub id (`names` that are not local folders): one request to the Hub;
    when it fails, the process goes offline and the loads read the local cache only."""
    if unreachable(hub_host()) or all(os.path.exists(n) for n in names):
        return
    from huggingface_hub.utils import get_session

    try:
        get_session().head(hub_host(), timeout=NETWORK_TIMEOUT)
    except Exception as err:  # the HTTP client's own errors are not OSErrors
        mark_unreachable(hub_host(), str(err))
