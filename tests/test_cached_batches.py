"""Training batches from the feature cache: device-resident and host-side paths agree."""

import pytest
import torch

from nano_dit.config import parse_config
from nano_dit.data import CachedBatches, cache_fits_on_device
from nano_dit.feature_cache import CachedBucket


def _bucket(size: tuple[int, int], ids: range) -> CachedBucket:
    """Every tensor of sample `i` holds `i`, so a batch shows which samples it took, row by row."""
    n, ids_ = len(ids), torch.tensor(list(ids), dtype=torch.float)
    fill = lambda *shape: ids_.view(n, *[1] * len(shape)).expand(n, *shape).clone()  # noqa: E731
    return CachedBucket(
        bucket=size,
        keys=[f"{i:03d}" for i in ids],
        captions=[f"caption {i}" for i in ids],
        meta=[None] * n,
        latents=fill(4, 2, 3),
        prompt_embeds=fill(5, 6),
        prompt_attention_mask=fill(5).long(),
        image_embeds=fill(7),
        image_tokens=fill(3, 7),
    )


BUCKETS = [_bucket((16, 24), range(0, 12)), _bucket((24, 16), range(12, 15))]  # the second smaller than a batch


def _draw(batches: CachedBatches, n: int) -> list[dict[str, torch.Tensor]]:
    return [{k: v.cpu() for k, v in next(batches).items()} for _ in range(n)]


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the pinned-memory path needs one")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_the_device_resident_cache_gives_the_batches_of_the_host_path(device):
    resident = CachedBatches(BUCKETS, 4, device, seed=3, on_device=True)
    host = CachedBatches(BUCKETS, 4, device, seed=3, on_device=False)
    assert resident.tensors[0]["latents"].device.type == device and host.tensors[0]["latents"].device.type == "cpu"
    a, b = _draw(resident, 40), _draw(host, 40)
    for x, y in zip(a, b):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    for batch in a:
        ids = batch["latents"][:, 0, 0, 0]
        assert all(torch.equal(t.flatten(1)[:, 0].float(), ids) for t in batch.values())  # rows stay together
        assert bool((ids < 12).all()) or bool((ids >= 12).all())  # one bucket per batch
    drawn = torch.cat([batch["latents"][:, 0, 0, 0] for batch in a])
    assert set(drawn.long().tolist()) == set(range(15))  # both buckets, every sample, over 40 draws


def test_the_stream_resumes_from_its_state_on_either_path():
    first = CachedBatches(BUCKETS, 4, "cpu", seed=5, on_device=True)
    _draw(first, 7)
    state = first.state_dict()
    expected = _draw(first, 5)
    resumed = CachedBatches(BUCKETS, 4, "cpu", seed=99, on_device=False)
    resumed.load_state_dict(state)
    assert all(torch.equal(x["latents"], y["latents"]) for x, y in zip(_draw(resumed, 5), expected))


def test_auto_keeps_the_cache_on_the_device_when_it_takes_a_quarter_of_free_memory_or_less(monkeypatch):
    assert CachedBatches(BUCKETS, 4, "cpu").on_device  # host memory is the CPU's own
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (4_000, 10_000))
    cuda = torch.device("cuda")
    assert cache_fits_on_device(1_000, cuda) and not cache_fits_on_device(1_001, cuda)


def test_a_bad_cache_placement_is_refused(capsys):
    with pytest.raises(SystemExit):
        parse_config(["--cache-on-device", "sometimes"])
    assert "argument --cache-on-device/--cache_on_device: invalid choice: 'sometimes'" in capsys.readouterr().err


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_small_host_tensors_reach_the_device_unchanged(device):
    from nano_dit.data import to_device

    masks = torch.tensor([True, False, True]), torch.randperm(7)
    moved = [to_device(m, torch.device(device)) for m in masks]
    assert all(m.device.type == device for m in moved)
    assert all(torch.equal(a, b.cpu()) and a.dtype == b.dtype for a, b in zip(masks, moved))
