"""Export, Hub push and loading anywhere: all offline (the Hub calls are replaced by recorders)."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch
from conftest import load_train_script
from safetensors.torch import load_file, save_file

from nano_dit import NanoDiTPipeline, NanoDiTTransformer2DModel
from nano_dit.config import parse_config
from nano_dit.hub import SAMPLE_GRID, card_info, export, load_pipeline

TOKEN = "hf_NotARealTokenButSecretAllTheSame"


def _files(folder) -> dict[str, str]:
    """Every file under `folder`, by relative path, with its content hash."""
    folder = Path(folder)
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


class FakeHub:
    """Stands in for the Hub: records each repo creation and each uploaded folder's files."""

    def __init__(self, monkeypatch, data: Path | None = None):
        self.uploads, self.tokens, self.created = [], [], []  # created: (repo, private, data made yet)
        self.data = data
        monkeypatch.setattr(huggingface_hub, "create_repo", self.create_repo)
        monkeypatch.setattr(huggingface_hub, "upload_folder", self.upload_folder)

    def create_repo(self, repo_id, token=None, private=None, exist_ok=False, **kwargs):
        self.tokens.append(token)
        self.created.append((repo_id, private, self.data is not None and self.data.exists()))
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, repo_id, folder_path, token=None, **kwargs):
        self.tokens.append(token)
        self.uploads.append((repo_id, _files(folder_path)))
        return f"https://huggingface.co/{repo_id}/commit/0"


def _train(tmp, stand_in_dir, *extra):
    args = [
        *("--num-images", "10", "--resolution", "64", "--no-pixel-mode", "--batch-size", "4"),
        *("--total-steps", "20", "--warmup-steps", "2", "--checkpoint-every", "10", "--log-every", "10"),
        *("--shards", str(tmp / "shards"), "--cache", str(tmp / "cache")),
        *("--stand-in-encoders", str(stand_in_dir), "--output-dir", str(tmp / "run")),
        *("--num-inference-steps", "2", "--lpips-backbone", "random", *extra),
    ]
    return load_train_script().main(args)


@pytest.fixture(scope="module")
def run(tmp_path_factory, stand_in_dir):
    """A short latent-space run (stand-in VAE, 64² images): checkpoints at steps 10 and 20, and
    checkpoint_final."""
    tmp = tmp_path_factory.mktemp("hub")
    _train(tmp, stand_in_dir)
    return tmp / "run" / "checkpoints"


def test_checkpoint_final_is_a_full_pipeline_with_a_model_card(run):
    pipe = NanoDiTPipeline.from_pretrained(run / "checkpoint_final")
    for name in ("vae", "text_encoder", "tokenizer", "image_encoder", "image_processor"):
        assert getattr(pipe, name) is not None, name
    info = card_info(pipe)
    assert info["step"] == 20 and info["encoders"]["stand_in"] is True
    assert info["cfg_dropout_scheme"].startswith("exclusive-bag100")
    assert "**Stand-in encoders.**" in pipe.model_card and "reconstruction_psnr" in pipe.model_card
    assert f"]({SAMPLE_GRID})" in pipe.model_card and (run / "checkpoint_final" / SAMPLE_GRID).exists()
    images = pipe("a small red circle on the left", num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 64, 64, 3)  # text only; 8×8 latents decoded by the VAE


def test_a_step_checkpoint_exports_its_ema_weights(run, tmp_path):
    export(run / "checkpoint_step0000010", tmp_path / "out")
    pipe = NanoDiTPipeline.from_pretrained(tmp_path / "out")
    ema_dir = run / "checkpoint_step0000010" / "transformer_ema"
    ema = load_file(ema_dir / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(p, ema[n]) for n, p in pipe.transformer.state_dict().items())
    assert json.loads((ema_dir / "config.json").read_text())["optimization_step"] == 10  # the EMA's own state
    raw = load_file(run / "checkpoint_step0000010" / "model.safetensors")  # the raw weights differ from EMA
    assert any(not torch.equal(raw[n], p) for n, p in pipe.transformer.state_dict().items())
    assert card_info(pipe)["step"] == 10


def test_export_push_and_pipe_push_write_the_same_folder(run, tmp_path, monkeypatch):
    hub = FakeHub(monkeypatch)
    export(run / "checkpoint_final", tmp_path / "a", repo_id="user/nano-dit")
    NanoDiTPipeline.from_pretrained(tmp_path / "a").push_to_hub("user/nano-dit")
    assert [repo for repo, _ in hub.uploads] == ["user/nano-dit", "user/nano-dit"]
    assert hub.uploads[0][1] == hub.uploads[1][1] == _files(tmp_path / "a")
    card = (tmp_path / "a" / "README.md").read_text()
    assert 'from_pretrained("user/nano-dit", trust_remote_code=True)' in card
    assert {"pipeline_nano_dit.py", "transformer/transformer_nano_dit.py", SAMPLE_GRID} <= set(_files(tmp_path / "a"))


def test_the_trainer_pushes_checkpoint_final_and_never_shows_the_token(tmp_path, stand_in_dir, monkeypatch, capfd):
    hub = FakeHub(monkeypatch)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    _train(tmp_path, stand_in_dir, "--push-to-hub", "--hub-model-id", "user/demo")
    (repo, files), *_ = hub.uploads
    assert repo == "user/demo" and files == _files(tmp_path / "run" / "checkpoints" / "checkpoint_final")
    out = capfd.readouterr()
    assert TOKEN not in out.out + out.err
    assert "user/demo" in out.out


def test_a_failed_push_says_why_in_one_line_and_where_the_local_copy_is(tmp_path, stand_in_dir, monkeypatch):
    hub = FakeHub(monkeypatch)

    def offline(repo_id, folder_path, token=None, **kwargs):
        raise OSError("Connection refused: huggingface.co\nmore detail")

    monkeypatch.setattr(hub, "upload_folder", offline)
    monkeypatch.setattr(huggingface_hub, "upload_folder", offline)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with pytest.raises(RuntimeError) as info:
        _train(tmp_path, stand_in_dir, "--push-to-hub", "--hub-model-id", "user/demo", "--total-steps", "10")
    final = tmp_path / "run" / "checkpoints" / "checkpoint_final"
    assert str(info.value) == (
        "the push to user/demo failed (OSError: Connection refused: huggingface.co); the pipeline is saved in "
        f"{final}: push it later with `nano-dit export {final} --push-to-hub user/demo`"
    )
    assert TOKEN not in str(info.value)
    NanoDiTPipeline.from_pretrained(final)  # the local copy is whole
    assert (tmp_path / "run" / "RESULTS.md").exists()  # and the report written


def test_the_hub_repo_is_created_before_any_work_and_private_when_asked(tmp_path, stand_in_dir, monkeypatch):
    hub = FakeHub(monkeypatch, data=tmp_path / "shards")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    _train(
        tmp_path, stand_in_dir, "--push_to_hub", "--hub_model_id", "user/demo", "--hub-private", "--total-steps", "10"
    )
    assert hub.created[0] == ("user/demo", True, False)  # at the start: not a shard written yet
    assert [repo for repo, _ in hub.uploads] == ["user/demo"]


def test_a_refused_hub_repo_stops_the_run_before_it_starts_in_one_line(tmp_path, stand_in_dir, monkeypatch):
    hub = FakeHub(monkeypatch)

    def refused(repo_id, token=None, **kwargs):
        raise OSError(f"401 Client Error: Unauthorized for url: https://huggingface.co/api/repos/create\n{token}")

    monkeypatch.setattr(hub, "create_repo", refused)
    monkeypatch.setattr(huggingface_hub, "create_repo", refused)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with pytest.raises(RuntimeError) as info:
        _train(tmp_path, stand_in_dir, "--push-to-hub", "--hub-model-id", "user/demo")
    message = str(info.value)
    assert message.startswith("--push-to-hub: the Hub repo user/demo could not be created or found (OSError: 401")
    assert "\n" not in message and TOKEN not in message and "nothing was trained" in message
    assert not (tmp_path / "shards").exists() and not (tmp_path / "run" / "checkpoints").exists()


def test_push_to_hub_without_a_token_is_refused_before_any_work(monkeypatch, capsys):
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(SystemExit) as exit_info:
        parse_config(["--push-to-hub"])
    assert exit_info.value.code == 2
    assert "--push-to-hub needs a Hugging Face token" in capsys.readouterr().err


def test_the_folder_loads_without_this_package_through_trust_remote_code(run, tmp_path):
    folder = run / "checkpoint_final"
    pipe = NanoDiTPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    embeds, mask = pipe.encode_prompt(["a large blue square at the top", "a small red circle"])
    image_embeds = torch.randn(2, embeds.shape[-1], generator=torch.Generator().manual_seed(0))
    save_file({"embeds": embeds, "mask": mask, "image_embeds": image_embeds}, tmp_path / "cond.safetensors")
    kwargs = dict(num_inference_steps=3, output_type="np")
    expected = pipe(
        prompt_embeds=embeds,
        prompt_attention_mask=mask,
        image_embeds=image_embeds,
        generator=torch.Generator().manual_seed(0),
        **kwargs,
    ).images

    script = f"""
import sys
sys.modules["nano_dit"] = None  # as if this package were not installed: importing it fails
import numpy as np, torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file

pipe = DiffusionPipeline.from_pretrained({str(folder)!r}, trust_remote_code=True)
pipe.set_progress_bar_config(disable=True)
c = load_file({str(tmp_path / "cond.safetensors")!r})
images = pipe(prompt_embeds=c["embeds"], prompt_attention_mask=c["mask"], image_embeds=c["image_embeds"],
              generator=torch.Generator().manual_seed(0), **{kwargs!r}).images
np.save({str(tmp_path / "remote.npy")!r}, images)
print(type(pipe).__module__, type(pipe.transformer).__module__)
"""
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    modules = done.stdout.split()[-2:]
    assert not any(m.split(".")[0] in ("nano_dit", "pipelines") for m in modules), modules
    assert (np.load(tmp_path / "remote.npy") == expected).all()


def test_installed_classes_load_the_folder_and_run_none_of_its_code(run, tmp_path):
    folder = tmp_path / "copy"
    export(run / "checkpoint_final", folder)
    for carried in (folder / "pipeline_nano_dit.py", folder / "transformer" / "transformer_nano_dit.py"):
        carried.write_text("raise RuntimeError('the carried code ran')\n")
    pipe = NanoDiTPipeline.from_pretrained(folder)
    assert type(pipe) is NanoDiTPipeline and type(pipe.transformer) is NanoDiTTransformer2DModel
    assert pipe.config._name_or_path == str(folder)


def test_a_hub_repo_id_is_downloaded_then_loaded_with_the_installed_classes(run, monkeypatch):
    calls = []

    def snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(run / "checkpoint_final")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    pipe = NanoDiTPipeline.from_pretrained("user/nano-dit", revision="v1", torch_dtype=torch.bfloat16)
    assert calls == [("user/nano-dit", {"revision": "v1"})]
    assert type(pipe.transformer) is NanoDiTTransformer2DModel and pipe.transformer.dtype == torch.bfloat16
    assert card_info(pipe)["step"] == 20


def test_export_refuses_what_it_cannot_read(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a pipeline folder .* nor a training checkpoint"):
        load_pipeline(tmp_path)
    with pytest.raises(ValueError, match="export needs --out DIR, --push-to-hub REPO_ID, or both"):
        export(tmp_path)


def test_model_index_names_the_carried_modules(run):
    index = json.loads((run / "checkpoint_final" / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_nano_dit", "NanoDiTPipeline"]
    assert index["transformer"] == ["transformer_nano_dit", "NanoDiTTransformer2DModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"]


def test_the_export_command(run, tmp_path, capsys):
    from nano_dit.cli import main

    main(["export", str(run / "checkpoint_step0000020"), "--out", str(tmp_path / "out")])
    assert "wrote the pipeline" in capsys.readouterr().out
    assert card_info(NanoDiTPipeline.from_pretrained(tmp_path / "out"))["step"] == 20
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(run / "checkpoint_step0000020")])
    assert exit_info.value.code == 2
    assert "export needs --out DIR, --push-to-hub REPO_ID, or both" in capsys.readouterr().err


def test_export_writes_aside_and_refuses_a_file_as_its_folder(run, tmp_path):
    (tmp_path / "a_file").write_text("keep me")
    with pytest.raises(NotADirectoryError, match="a_file is a file; give a folder"):
        export(run / "checkpoint_final", tmp_path / "a_file")
    assert (tmp_path / "a_file").read_text() == "keep me"
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "stale.txt").write_text("from before")
    export(run / "checkpoint_final", tmp_path / "out")
    assert not (tmp_path / "out" / "stale.txt").exists()  # replaced whole, not written over
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "out"]  # nothing left aside
    NanoDiTPipeline.from_pretrained(tmp_path / "out")


def test_a_damaged_weights_file_is_named_in_the_users_folder(run, tmp_path):
    import shutil

    folder = tmp_path / "damaged"
    shutil.copytree(run / "checkpoint_final", folder)
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(Exception, match=f"could not load the pipeline in {folder}") as info:
        NanoDiTPipeline.from_pretrained(folder)
    assert "/tmp" not in str(info.value).replace(str(tmp_path), "")  # no temporary path of ours
    with pytest.raises(FileNotFoundError, match="not a saved pipeline"):
        NanoDiTPipeline.from_pretrained(tmp_path)
