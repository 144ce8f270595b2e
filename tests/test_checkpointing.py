import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TWO_CPU_PROCESSES, TWO_CPU_PROCESSES_ENV, load_train_script
from safetensors.torch import load_file

from nano_dit import checkpointing
from nano_dit.checkpointing import check_resumable, list_checkpoints, resolve_resume
from nano_dit.config import TrainConfig
from nano_dit.flow_matching import FlowMatching

train_nano_dit = load_train_script()


class Killed(Exception):
    """Stands in for a kill signal at a chosen point of a run."""


def _args(tmp_path, stand_in_dir, out, *extra):
    return [
        *("--num-images", "8", "--resolution", "16", "--batch-size", "4", "--warmup-steps", "2"),
        *("--total-steps", "8", "--checkpoint-every", "4", "--log-every", "3"),
        *("--shards", str(tmp_path / "shards"), "--cache", str(tmp_path / "cache")),
        *("--stand-in-encoders", str(stand_in_dir), "--output-dir", str(tmp_path / out)),
        "--no-validation",  # tests/test_validation.py covers it
        *extra,
    ]


def _state(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    """Model weights, optimizer moments and EMA weights of a step checkpoint, by name. (The EMA's
    step count, in `transformer_ema/config.json`, advances on skipped steps too, as the LR does.)"""
    folder = run_dir / "checkpoints" / checkpointing.checkpoint_name(step)
    tensors = {f"model.{k}": v for k, v in load_file(folder / "model.safetensors").items()}
    optimizer = torch.load(folder / "optimizer.bin", weights_only=True)["state"]
    for index, moments in optimizer.items():
        tensors.update({f"optim.{index}.{k}": v for k, v in moments.items() if torch.is_tensor(v)})
    ema = folder / "transformer_ema"
    tensors.update({f"ema.{k}": v for k, v in load_file(ema / "diffusion_pytorch_model.safetensors").items()})
    return tensors


def test_checkpointing_leaves_the_training_unchanged(tmp_path, stand_in_dir):
    """Saving a checkpoint (the EMA's folder builds a model to save) draws none of training's random
    numbers: a run saved at steps 4 and 8 ends as one saved at step 8 alone."""
    train_nano_dit.main(_args(tmp_path, stand_in_dir, "twice"))
    train_nano_dit.main(_args(tmp_path, stand_in_dir, "once", "--checkpoint-every", "8"))
    twice, once = _state(tmp_path / "twice", 8), _state(tmp_path / "once", 8)
    assert twice.keys() == once.keys() and all(torch.equal(twice[k], once[k]) for k in twice)


@pytest.mark.slow
def test_a_resumed_run_is_the_run_that_never_stopped(tmp_path, stand_in_dir, monkeypatch):
    train_nano_dit.main(_args(tmp_path, stand_in_dir, "straight"))

    real_save = train_nano_dit.save_checkpoint

    def save_then_die(accelerator, checkpoint_dir, step, *args, **kwargs):
        real_save(accelerator, checkpoint_dir, step, *args, **kwargs)
        if step == 4:
            raise Killed

    monkeypatch.setattr(train_nano_dit, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        train_nano_dit.main(_args(tmp_path, stand_in_dir, "stopped"))
    monkeypatch.setattr(train_nano_dit, "save_checkpoint", real_save)
    train_nano_dit.main(_args(tmp_path, stand_in_dir, "stopped", "--resume", "latest"))

    straight, resumed = _state(tmp_path / "straight", 8), _state(tmp_path / "stopped", 8)
    assert straight.keys() == resumed.keys() and len(straight) > 20
    for name, tensor in straight.items():
        assert torch.equal(tensor, resumed[name]), name
    log = (tmp_path / "stopped" / "checkpoints" / "training_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log] == list(range(1, 9))  # each step exactly once
    weights = "checkpoints/checkpoint_final/transformer/diffusion_pytorch_model.safetensors"
    straight_final, resumed_final = (
        load_file(tmp_path / "straight" / weights),
        load_file(tmp_path / "stopped" / weights),
    )
    assert all(torch.equal(v, resumed_final[k]) for k, v in straight_final.items())


@pytest.mark.slow
def test_a_kill_during_a_save_leaves_the_previous_checkpoint_whole(tmp_path, stand_in_dir, monkeypatch):
    real_replace = checkpointing.os.replace

    def replace(src, dst):
        if str(dst).endswith("checkpoint_step0000008"):
            raise Killed  # after the state is written aside, before it takes its name
        real_replace(src, dst)

    monkeypatch.setattr(checkpointing.os, "replace", replace)
    with pytest.raises(Killed):
        train_nano_dit.main(_args(tmp_path, stand_in_dir, "run"))
    ckpts = tmp_path / "run" / "checkpoints"
    assert [p.name for p in list_checkpoints(ckpts)] == ["checkpoint_step0000004"]
    assert (ckpts / ".checkpoint_step0000008.partial").exists()  # written aside, never picked up
    assert resolve_resume("latest", ckpts).name == "checkpoint_step0000004"

    monkeypatch.setattr(checkpointing.os, "replace", real_replace)
    train_nano_dit.main(_args(tmp_path, stand_in_dir, "run", "--resume", "latest"))
    assert [p.name for p in list_checkpoints(ckpts)] == ["checkpoint_step0000004", "checkpoint_step0000008"]
    assert not (ckpts / ".checkpoint_step0000008.partial").exists()


def test_old_checkpoints_past_the_limit_are_removed(tmp_path, stand_in_dir):
    train_nano_dit.main(
        _args(tmp_path, stand_in_dir, "run", "--checkpoint-every", "2", "--checkpoints-total-limit", "2")
    )
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == [
        "checkpoint_step0000006",
        "checkpoint_step0000008",
    ]


def test_checkpoint_dir_puts_checkpoints_and_the_log_elsewhere(tmp_path, stand_in_dir):
    elsewhere = tmp_path / "elsewhere"
    args = _args(tmp_path, stand_in_dir, "run", "--total-steps", "4", "--checkpoint-dir", str(elsewhere))
    train_nano_dit.main(args)
    assert [p.name for p in list_checkpoints(elsewhere)] == ["checkpoint_step0000004"]
    assert (elsewhere / "training_log.jsonl").exists() and (elsewhere / "checkpoint_final").is_dir()
    assert not (tmp_path / "run" / "checkpoints").exists()
    more = ["--total-steps", "8", "--checkpoint-dir", str(elsewhere), "--resume", "latest"]  # "latest" looks there
    train_nano_dit.main([*args[:-4], *more])
    assert [p.name for p in list_checkpoints(elsewhere)][-1] == "checkpoint_step0000008"


def test_resuming_with_another_cfg_dropout_scheme_is_refused(tmp_path, stand_in_dir):
    train_nano_dit.main(_args(tmp_path, stand_in_dir, "run", "--total-steps", "4"))
    other = ("--p-both", "0.4", "--p-none", "0.2", "--p-text-only", "0.2", "--p-image-only", "0.2")
    with pytest.raises(ValueError, match="trained with CFG-dropout scheme .*independent-Bernoulli"):
        train_nano_dit.main(_args(tmp_path, stand_in_dir, "run", "--total-steps", "8", "--resume", "latest", *other))


def test_another_architecture_and_missing_checkpoints_are_refused(tmp_path):
    saved = {"cfg_dropout_scheme": "s", "config": {"model": {"num_layers": 4, "hidden_size": 128}}}
    with pytest.raises(ValueError, match="another architecture .*num_layers: saved 4, now 12"):
        check_resumable(saved, {"num_layers": 12, "hidden_size": 128}, "s", tmp_path)
    with pytest.raises(FileNotFoundError, match="not a training checkpoint"):
        resolve_resume(str(tmp_path / "nope"), tmp_path)
    assert resolve_resume("latest", tmp_path) is None  # nothing to resume: step 0 (with a warning)


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncated":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif how == "empty":
        path.write_bytes(b"")
    else:  # 2 KB zeroed in the middle: same size, other contents
        middle = len(data) // 2
        data[middle : middle + 2048] = bytes(min(2048, len(data) - middle))
        path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory, stand_in_dir):
    tmp = tmp_path_factory.mktemp("damage")
    train_nano_dit.main(_args(tmp, stand_in_dir, "run"))
    return tmp / "run" / "checkpoints"


@pytest.mark.parametrize(
    "file,how",
    [
        ("model.safetensors", "zeroed"),
        ("model.safetensors", "truncated"),
        ("optimizer.bin", "empty"),
        ("transformer_ema/diffusion_pytorch_model.safetensors", "truncated"),
        ("random_states_0.pkl", "truncated"),
        ("training_state.json", "zeroed"),
    ],
)
def test_latest_passes_over_a_damaged_checkpoint_and_a_named_one_is_refused(
    two_checkpoints, tmp_path, file, how, caplog
):
    ckpts = tmp_path / "checkpoints"
    shutil.copytree(two_checkpoints, ckpts)
    newest = ckpts / "checkpoint_step0000008"
    assert checkpointing.verify_checkpoint(newest) is None
    _damage(newest / file, how)
    assert file in checkpointing.verify_checkpoint(newest)
    with caplog.at_level("WARNING"):
        assert resolve_resume("latest", ckpts).name == "checkpoint_step0000004"
    assert f"skipping checkpoint_step0000008 ({file} is damaged" in caplog.text
    with pytest.raises(ValueError, match=f"--resume {newest}: {file} is damaged"):
        resolve_resume(str(newest), ckpts)
    _damage(ckpts / "checkpoint_step0000004" / "model.safetensors", "zeroed")
    with pytest.raises(ValueError, match="every checkpoint in .* is damaged"):
        resolve_resume("latest", ckpts)


def test_a_run_whose_first_save_never_completed_resumes_from_the_start(tmp_path, stand_in_dir, monkeypatch, caplog):
    real_replace = checkpointing.os.replace

    def killed_at_the_first_save(src, dst):
        if Path(dst).name.startswith("checkpoint_step"):
            raise Killed  # the state written aside, never renamed
        real_replace(src, dst)

    monkeypatch.setattr(checkpointing.os, "replace", killed_at_the_first_save)
    with pytest.raises(Killed):
        train_nano_dit.main(_args(tmp_path, stand_in_dir, "run"))
    ckpts = tmp_path / "run" / "checkpoints"
    assert list_checkpoints(ckpts) == [] and (ckpts / ".checkpoint_step0000004.partial").exists()
    monkeypatch.setattr(checkpointing.os, "replace", real_replace)
    with caplog.at_level("WARNING"):
        train_nano_dit.main(_args(tmp_path, stand_in_dir, "run", "--resume", "latest"))
    assert "(.checkpoint_step0000004.partial never completed); starting from step 0" in caplog.text
    log = (ckpts / "training_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log] == list(range(1, 9))  # each step once, from 1
    assert [p.name for p in list_checkpoints(ckpts)] == ["checkpoint_step0000004", "checkpoint_step0000008"]


def test_a_kill_while_writing_checkpoint_final_keeps_the_previous_one_whole(tmp_path, stand_in_dir, monkeypatch):
    from nano_dit import NanoDiTPipeline

    train_nano_dit.main(_args(tmp_path, stand_in_dir, "run", "--total-steps", "4"))
    final = tmp_path / "run" / "checkpoints" / "checkpoint_final"
    before = sorted(p.relative_to(final) for p in final.rglob("*"))
    real_save = NanoDiTPipeline.save_pretrained

    def dies_half_way(self, directory, **kwargs):
        real_save(self, directory, **kwargs)
        (Path(directory) / "transformer" / "diffusion_pytorch_model.safetensors").unlink()  # half written
        raise Killed

    monkeypatch.setattr(NanoDiTPipeline, "save_pretrained", dies_half_way)
    args = _args(tmp_path, stand_in_dir, "run", "--total-steps", "8", "--resume", "latest")
    with pytest.raises(Killed):
        train_nano_dit.main(args)
    assert sorted(p.relative_to(final) for p in final.rglob("*")) == before  # the step-4 pipeline, whole
    monkeypatch.setattr(NanoDiTPipeline, "save_pretrained", real_save)
    NanoDiTPipeline.from_pretrained(final)


def test_a_new_run_does_not_overwrite_an_earlier_one(tmp_path, stand_in_dir):
    train_nano_dit.main(_args(tmp_path, stand_in_dir, "run", "--total-steps", "4"))
    with pytest.raises(FileExistsError, match="already holds a run; pass --resume latest"):
        train_nano_dit.main(_args(tmp_path, stand_in_dir, "run", "--total-steps", "4"))
    later = ("--total-steps", "8", "--checkpoint-every", "2", "--overwrite-output-dir")
    train_nano_dit.main(_args(tmp_path, stand_in_dir, "run", *later))
    train_nano_dit.main(_args(tmp_path, stand_in_dir, "run", "--total-steps", "4", "--overwrite-output-dir"))
    # The earlier run's later checkpoints are gone: `--resume latest` finds this run's.
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == ["checkpoint_step0000004"]


class NaNAtSteps(FlowMatching):
    """The real objective, whose loss turns NaN on the chosen calls (1-based)."""

    def __init__(self, bad_calls):
        super().__init__()
        self.bad_calls, self.calls = set(bad_calls), 0

    def loss(self, *args, **kwargs):
        out = super().loss(*args, **kwargs)
        self.calls += 1
        if self.calls in self.bad_calls or "all" in self.bad_calls:
            out.loss = out.loss * float("nan")
        return out


def test_a_non_finite_step_is_skipped_counted_and_logged(tmp_path, stand_in_dir, monkeypatch):
    monkeypatch.setattr(TrainConfig, "objective", lambda config: NaNAtSteps({3}))
    train_nano_dit.main(_args(tmp_path, stand_in_dir, "run", "--checkpoint-every", "1"))
    log = [json.loads(line) for line in (tmp_path / "run/checkpoints/training_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r.get("skipped")] == [3]
    # Skipped on the device: step 3 left the weights, the moments (and their step count) and the EMA
    # exactly as step 2 did, as a skip decided on the host would; step 4 trained again.
    before, skipped, after = (_state(tmp_path / "run", step) for step in (2, 3, 4))
    assert before.keys() == skipped.keys() and all(torch.equal(before[k], skipped[k]) for k in before)
    ema = [k for k in after if k.startswith("ema.")]
    assert ema and not all(torch.equal(after[k], skipped[k]) for k in ema)
    for step in (4, 8):
        assert all(torch.isfinite(t).all() for t in _state(tmp_path / "run", step).values())


def test_non_finite_steps_in_a_row_stop_the_run_with_a_message(tmp_path, stand_in_dir, monkeypatch):
    monkeypatch.setattr(TrainConfig, "objective", lambda config: NaNAtSteps({"all"}))
    with pytest.raises(RuntimeError, match="3 steps in a row had a non-finite loss or gradient .* Lower --peak-lr"):
        train_nano_dit.main(_args(tmp_path, stand_in_dir, "run", "--max-bad-steps", "3"))
    assert list_checkpoints(tmp_path / "run" / "checkpoints") == []  # nothing non-finite was saved
    report = (tmp_path / "run" / "RESULTS.md").read_text()  # judged on its log, which kept every step
    assert report.startswith("# Validation: ❌ NO-GO") and "then the run stopped itself" in report
    log = (tmp_path / "run" / "checkpoints" / "training_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log] == [1, 2, 3]


def test_gradient_checkpointing_flag_trains_the_same_steps(tmp_path, stand_in_dir):
    train_nano_dit.main(_args(tmp_path, stand_in_dir, "plain", "--total-steps", "4"))
    train_nano_dit.main(_args(tmp_path, stand_in_dir, "ckpt", "--total-steps", "4", "--gradient-checkpointing"))
    plain, ckpt = _state(tmp_path / "plain", 4), _state(tmp_path / "ckpt", 4)
    for name, tensor in plain.items():
        torch.testing.assert_close(ckpt[name], tensor, msg=name)


def test_8bit_adam_without_bitsandbytes_says_what_to_install(tmp_path, stand_in_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed
    with pytest.raises(ImportError, match=r'pip install "nano-dit\[gpu\]"'):
        train_nano_dit.main(_args(tmp_path, stand_in_dir, "run", "--use-8bit-adam"))


def _launch_two_processes(args):
    script = Path(__file__).parents[1] / "train_nano_dit.py"
    result = subprocess.run(
        [sys.executable, *TWO_CPU_PROCESSES, str(script), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **TWO_CPU_PROCESSES_ENV},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_two_processes_train_with_ddp_and_only_the_main_one_writes(tmp_path, stand_in_dir):
    # A checkpoint every step: each one first checks that both ranks hold the same weights. A
    # validation at the end, shared by the two processes (8 images in batches of 4), written once.
    validation = ["--validation", "--num-inference-steps", "2", "--lpips-backbone", "random"]
    validation += ["--validation-batch-size", "4"]
    args = _args(tmp_path, stand_in_dir, "run", "--total-steps", "4", "--checkpoint-every", "1", *validation)
    result = _launch_two_processes(args)
    assert result.stdout.count("validation at step 4:") == 1
    results = json.loads((tmp_path / "run" / "validation" / "step0000004" / "results.json").read_text())
    assert results["timings"]["processes"] == 2 and len(results["reconstruction"]["per_image"]) == 8
    assert len(list((tmp_path / "run" / "validation" / "step0000004" / "reconstruction").glob("*.png"))) == 8 + 1
    ckpts = tmp_path / "run" / "checkpoints"
    assert len(list_checkpoints(ckpts)) == 4
    last = ckpts / "checkpoint_step0000004"
    assert {p.name for p in last.glob("random_states_*.pkl")} == {"random_states_0.pkl", "random_states_1.pkl"}
    # Each process saved its own sampler streams (they differ: seed + rank), for an exact resume.
    states = [torch.load(last / f"process_state_{i}.pt", weights_only=True) for i in range(2)]
    assert not torch.equal(states[0]["cfg_dropout"]["bag"], states[1]["cfg_dropout"]["bag"])
    log = (ckpts / "training_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log] == [1, 2, 3, 4]  # written once, by the main process
    assert json.loads(log[-1])["lr"] == pytest.approx(1e-6)  # the schedule spans the run whatever the processes
    assert "NanoDiT:" in result.stdout and result.stdout.count("NanoDiT:") == 1  # printed by the main process

    # Killed right after the step-2 save (what such a kill leaves: checkpoint 2, a log that ran on),
    # then resumed by two processes: the very run that never stopped.
    shutil.copytree(tmp_path / "run", tmp_path / "stopped")
    for later in ("checkpoint_step0000003", "checkpoint_step0000004", "checkpoint_final"):
        shutil.rmtree(tmp_path / "stopped" / "checkpoints" / later)
    stopped = _args(tmp_path, stand_in_dir, "stopped", "--total-steps", "4", "--checkpoint-every", "1")
    _launch_two_processes([*stopped, "--resume", "latest"])
    straight, resumed = _state(tmp_path / "run", 4), _state(tmp_path / "stopped", 4)
    assert straight.keys() == resumed.keys()
    for name, tensor in straight.items():
        assert torch.equal(tensor, resumed[name]), name
    log = (tmp_path / "stopped" / "checkpoints" / "training_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log] == [1, 2, 3, 4]


def test_gradient_accumulation_draws_that_many_micro_batches_per_step(tmp_path, stand_in_dir):
    train_nano_dit.main(_args(tmp_path, stand_in_dir, "run", "--gradient-accumulation-steps", "3"))
    folder = tmp_path / "run" / "checkpoints" / "checkpoint_step0000008"
    cfg_dropout = torch.load(folder / "process_state_0.pt", weights_only=True)["cfg_dropout"]
    assert cfg_dropout["num_drawn"] == 8 * 3 * 4  # steps x micro-batches x batch size
    log = (tmp_path / "run" / "checkpoints" / "training_log.jsonl").read_text().splitlines()
    assert len(log) == 8 and json.loads(log[-1])["lr"] == pytest.approx(1e-6)


def test_out_of_memory_names_the_remedies_and_the_last_good_checkpoint(tmp_path, stand_in_dir, monkeypatch):
    class OutOfMemoryAtStep5(FlowMatching):
        calls = 0

        def loss(self, *args, **kwargs):
            self.calls += 1
            if self.calls == 5:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return super().loss(*args, **kwargs)

    monkeypatch.setattr(TrainConfig, "objective", lambda config: OutOfMemoryAtStep5())
    with pytest.raises(train_nano_dit.OutOfMemory) as info:
        train_nano_dit.main(_args(tmp_path, stand_in_dir, "run"))
    message = str(info.value)
    assert message.startswith("out of device memory at step 5.")
    assert "--batch-size 2 (now 4)" in message and "--gradient-checkpointing" in message
    assert "--use-8bit-adam" in message and "--mixed-precision bf16" in message
    assert message.endswith(f"{tmp_path / 'run' / 'checkpoints' / 'checkpoint_step0000004'} (--resume latest).")
    assert isinstance(info.value.__cause__, torch.cuda.OutOfMemoryError)


def test_a_compiled_run_trains_the_same_steps_and_saves_plain_names(tmp_path, stand_in_dir, monkeypatch):
    # "eager": dynamo captures the graphs (a graph break would show here) without generating code
    train_nano_dit.main(_args(tmp_path, stand_in_dir, "plain", "--total-steps", "4"))
    compiled_models, real_compile = [], torch.compile

    def compile_and_record(model, **kwargs):
        compiled_models.append(
            (type(model).__name__, kwargs.get("backend"), kwargs.get("mode") or "default", kwargs.get("dynamic"))
        )
        return real_compile(model, **kwargs)

    monkeypatch.setattr(torch, "compile", compile_and_record)
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()  # its settings (the dynamo backend) outlive an Accelerator within one process
    try:
        train_nano_dit.main(
            _args(tmp_path, stand_in_dir, "compiled", "--total-steps", "4", "--compile", "--compile-backend", "eager")
        )
    finally:
        AcceleratorState._reset_state()  # the next tests start uncompiled
    # static graphs (one per bucket shape); CUDA graphs ("reduce-overhead") are the default on CUDA only
    assert compiled_models == [("NanoDiTTransformer2DModel", "eager", "default", False)]
    config = json.loads((tmp_path / "compiled" / "config.json").read_text())
    assert (config["compile"], config["compile_backend"], config["compile_mode"]) == (True, "eager", "default")
    plain, compiled = _state(tmp_path / "plain", 4), _state(tmp_path / "compiled", 4)
    assert plain.keys() == compiled.keys()  # no "_orig_mod." in what is saved
    for name, tensor in plain.items():
        torch.testing.assert_close(compiled[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    final = load_file(
        tmp_path
        / "compiled"
        / "checkpoints"
        / "checkpoint_final"
        / "transformer"
        / "diffusion_pytorch_model.safetensors"
    )
    assert not any("_orig_mod" in k for k in final)


def test_the_transformer_compiles_without_graph_breaks(tiny_model, tiny_config):
    from conftest import make_inputs

    inputs = make_inputs(tiny_config)
    inputs.update(drop_text=torch.tensor([True, False]), drop_image=torch.tensor([False, True]))
    explanation = torch._dynamo.explain(tiny_model)(**inputs)
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]
    assert explanation.graph_count == 1
