import pytest
import torch

from nano_dit import CFGDropout, CFGMode


def _draw(cfg, total, chunk):
    return torch.cat([cfg.sample_modes(min(chunk, total - i)) for i in range(0, total, chunk)])


@pytest.mark.parametrize("chunk", [1, 7, 64, 100, 333])
def test_every_block_of_100_draws_has_exact_counts(chunk):
    modes = _draw(CFGDropout(seed=3), 1000, chunk)
    for block in modes.view(10, 100):
        counts = torch.bincount(block, minlength=4).tolist()
        assert counts == [70, 10, 10, 10]  # both, none, text-only, image-only


def test_custom_probabilities_are_exact_too():
    cfg = CFGDropout(p_both=0.5, p_none=0.2, p_text_only=0.2, p_image_only=0.1, seed=1)
    for block in _draw(cfg, 500, 37).view(5, 100):
        assert torch.bincount(block, minlength=4).tolist() == [50, 20, 20, 10]


def test_modes_are_mutually_exclusive_and_match_the_masks():
    cfg = CFGDropout(seed=0)
    state = cfg.state_dict()
    drop_text, drop_image = cfg.sample(300)
    cfg.load_state_dict(state)
    modes = cfg.sample_modes(300)
    assert drop_text.dtype == torch.bool and drop_text.shape == (300,)
    expected = {
        CFGMode.BOTH: (False, False),
        CFGMode.NONE: (True, True),
        CFGMode.TEXT_ONLY: (False, True),
        CFGMode.IMAGE_ONLY: (True, False),
    }
    for m, t, i in zip(modes.tolist(), drop_text.tolist(), drop_image.tolist()):
        assert (t, i) == expected[CFGMode(m)]
    # the shares follow from exact counts: text dropped in none + image-only = 20 %
    assert drop_text.sum().item() == 60 and drop_image.sum().item() == 60
    assert (drop_text & drop_image).sum().item() == 30


def test_same_seed_same_sequence_other_seed_other_sequence():
    assert torch.equal(CFGDropout(seed=5).sample_modes(250), CFGDropout(seed=5).sample_modes(250))
    assert not torch.equal(CFGDropout(seed=5).sample_modes(250), CFGDropout(seed=6).sample_modes(250))


def test_state_restore_continues_the_same_sequence(tmp_path):
    straight = CFGDropout(seed=2)
    straight.sample_modes(37)
    torch.save(straight.state_dict(), tmp_path / "cfg.pt")
    expected = straight.sample_modes(150)

    resumed = CFGDropout(seed=2)
    resumed.load_state_dict(torch.load(tmp_path / "cfg.pt", weights_only=True))
    assert resumed.num_drawn == 37
    assert torch.equal(resumed.sample_modes(150), expected)


def test_restoring_a_state_from_another_scheme_is_refused():
    other = CFGDropout(p_both=0.4, p_none=0.2, p_text_only=0.2, p_image_only=0.2)
    with pytest.raises(ValueError, match="CFG-dropout scheme .*exclusive-bag100:both=40"):
        CFGDropout().load_state_dict(other.state_dict())


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"p_none": -0.1, "p_both": 0.9}, "p_none must be a probability >= 0, got -0.1"),
        ({"p_both": 0.8}, "must sum to 1, got 1.1"),
        ({"p_both": 0.695, "p_none": 0.105}, "p_both=0.695 is not a whole number of draws out of bag_size=100"),
        ({"bag_size": 0}, "bag_size must be a positive integer"),
    ],
)
def test_bad_probabilities_raise_a_value_error_naming_them(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CFGDropout(**kwargs)


def test_the_old_independent_bernoulli_scheme_mixes_the_modes_and_names_itself():
    from conftest import load_script

    IndependentDropout = load_script("validation_power").IndependentDropout  # the fault harness's
    old = IndependentDropout(0.2, 0.2, seed=0)
    drop_text, drop_image = old.sample(20000)
    both_dropped = (drop_text & drop_image).float().mean().item()
    assert both_dropped == pytest.approx(0.04, abs=0.01)  # 0.2 × 0.2, not the 10 % CFG needs
    assert drop_text.float().mean().item() == pytest.approx(0.2, abs=0.01)
    assert old.scheme == "independent-bernoulli:text=0.2,image=0.2"
    assert not old.scheme.startswith("exclusive")  # what resume and validation check
    state = old.state_dict()
    again = IndependentDropout(0.2, 0.2, seed=1)
    again.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(old.sample(50), again.sample(50)))


def test_a_recorded_scheme_reads_back_as_its_counts():
    from nano_dit.cfg_dropout import scheme_counts

    assert scheme_counts(CFGDropout(0.8, 0.1, 0.0, 0.1).scheme) == {
        "both": 80,
        "none": 10,
        "text_only": 0,
        "image_only": 10,
    }
    assert scheme_counts("independent-bernoulli:text=0.2,image=0.2") is None
