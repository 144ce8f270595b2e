import os

# No test reaches the Hugging Face Hub: every model here is built or saved locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from nano_dit import NanoDiTTransformer2DModel  # noqa: E402

# A model small enough that every test runs in well under a second on a CPU.
TINY_CONFIG = dict(
    num_layers=2,
    hidden_size=32,
    num_attention_heads=4,
    patch_size=2,
    in_channels=4,
    text_embed_dim=24,
    image_embed_dim=16,
    sample_size=8,
)


@pytest.fixture
def tiny_config():
    return dict(TINY_CONFIG)


def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.1) -> torch.nn.Module:
    """Fill every parameter with noise, so that zero-initialised layers do not hide behaviour."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


@pytest.fixture
def tiny_model(tiny_config):
    torch.manual_seed(0)
    return randomize_(NanoDiTTransformer2DModel(**tiny_config)).eval()


def make_inputs(config, batch=2, height=8, width=8, text_len=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, config["in_channels"], height, width, generator=g),
        timestep=torch.rand(batch, generator=g) * 1000,
        encoder_hidden_states=torch.randn(batch, text_len, config["text_embed_dim"], generator=g),
        encoder_attention_mask=torch.ones(batch, text_len, dtype=torch.long),
        image_embeds=torch.randn(batch, config["image_embed_dim"], generator=g),
    )


@pytest.fixture(scope="session")
def stand_in_dir(tmp_path_factory):
    """Tiny random T5 / DINOv3 / Flux-layout VAE, written once per test session."""
    from nano_dit.encoders import make_stand_in_encoders

    return make_stand_in_encoders(tmp_path_factory.mktemp("encoders"), seed=0, image_size=32)


# DDP on CPU: Accelerate's multi-process launcher with two processes, and ACCELERATE_USE_CPU for the
# gloo backend. Followed by a script (or `-m module`) and its arguments.
TWO_CPU_PROCESSES = [
    *("-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"),
    *("--mixed_precision", "no", "--dynamo_backend", "no"),
]
TWO_CPU_PROCESSES_ENV = {"HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "1"}


def load_train_script():
    """train_nano_dit.py as a module: it is a script (so that `accelerate launch` runs it), not
    part of the package."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("train_nano_dit", Path(__file__).parents[1] / "train_nano_dit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_benchmark(name: str):
    """benchmarks/<name>.py as a module, with benchmarks/ importable as it is when run as a script."""
    import importlib.util
    import sys
    from pathlib import Path

    folder = Path(__file__).parents[1] / "benchmarks"
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_script(name: str):
    """scripts/<name>.py as a module (e.g. validation_power, whose fault harness tests use)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
