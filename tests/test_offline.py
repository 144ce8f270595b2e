"""Offline-safe: with HF_HUB_OFFLINE=1 nothing reaches out, after one failed download nothing tries
that host again in the process, and validation still has a pretrained perceptual metric (ST-LPIPS)."""

import urllib.error

import pytest
import torch
from huggingface_hub import constants

from nano_dit import offline
from nano_dit.metrics import ImageMetrics, alexnet_weights_path


@pytest.fixture
def no_cached_alexnet(tmp_path, monkeypatch):
    """An empty torch.hub cache, and a network that records each attempt and fails it."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    attempts = []

    def unreachable(request, *args, **kwargs):
        attempts.append(getattr(request, "full_url", request))
        raise urllib.error.URLError("Network is unreachable")

    monkeypatch.setattr(torch.hub, "urlopen", unreachable)
    monkeypatch.setattr(offline, "_unreachable", {})
    return attempts


@pytest.fixture
def online_mode(monkeypatch):
    """As on a machine with no HF_HUB_OFFLINE set (the tests' own conftest sets it)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def test_offline_the_alexnet_download_is_not_even_tried(no_cached_alexnet, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    metrics = ImageMetrics(backbone="pretrained")
    assert no_cached_alexnet == []
    assert not alexnet_weights_path().exists()
    assert metrics.describe["available"] is False and "this process is offline" in metrics.describe["reason"]
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    figures = metrics.compare(x, x.flip(-1))
    assert figures["lpips"] is None  # never a made-up figure
    assert min(figures["stlpips"]) > 0.01  # the pretrained perceptual metric is there all the same
    assert metrics.distance_name == "stlpips" and metrics.distance(x, x).tolist() == [0.0, 0.0]


def test_after_one_failed_download_nothing_tries_that_host_again(no_cached_alexnet, online_mode, monkeypatch):
    first = ImageMetrics(backbone="pretrained")
    assert len(no_cached_alexnet) == 1 and "alexnet" in no_cached_alexnet[0]
    assert "could not be fetched" in first.describe["reason"]
    assert offline.unreachable("download.pytorch.org")

    second = ImageMetrics(backbone="pretrained")
    assert len(no_cached_alexnet) == 1  # not tried again
    assert second.describe["available"] is False
    # PyTorch's download server is not the Hub: a run may still push its result at the end
    assert not offline.is_offline() and not constants.HF_HUB_OFFLINE


def test_an_unreachable_hub_is_asked_once_and_the_process_goes_offline(online_mode, monkeypatch):
    monkeypatch.setattr(offline, "_unreachable", {})
    asked = []

    class Session:
        def head(self, url, timeout):
            asked.append((url, timeout))
            raise ConnectionError("unreachable")

    import huggingface_hub.utils

    monkeypatch.setattr(huggingface_hub.utils, "get_session", lambda: Session())
    offline.check_hub_reachable(["/a/local/folder/that/does/not/exist", "google/t5-v1_1-base"])
    offline.check_hub_reachable(["google/t5-v1_1-base"])
    assert len(asked) == 1 and asked[0][1] == offline.NETWORK_TIMEOUT
    assert offline.is_offline() and constants.HF_HUB_OFFLINE


def test_local_folders_need_no_network(tmp_path, online_mode, monkeypatch):
    monkeypatch.setattr(offline, "_unreachable", {})
    import huggingface_hub.utils

    monkeypatch.setattr(huggingface_hub.utils, "get_session", lambda: pytest.fail("a local load asked the Hub"))
    offline.check_hub_reachable([str(tmp_path)])
    assert not offline.is_offline()
