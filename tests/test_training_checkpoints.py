"""Training checkpoints (safetensors + JSON outside the pipeline folder, write-then-rotate, verified on load,
never unpickled), the run lock, the argument checks, the Hub checks and what an upload sends (CPU, tiny runs)."""

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file

from diffusers_scorekit import cli, training
from diffusers_scorekit.training import checkpoints as checkpoints_module

REPO_ROOT = Path(__file__).resolve().parent.parent
WEIGHTS = Path("unet") / "diffusion_pytorch_model.safetensors"
TINY_TOY = ["--dataset", "two_moons", "--num_toy_samples", "2000", "--hidden_dim", "32", "--num_layers", "2",
            "--train_batch_size", "64", "--lr_warmup_steps", "5", "--num_inference_steps", "3",
            "--num_eval_samples", "32", "--eval_likelihood_samples", "0", "--use_ema"]


def train(output_dir, *extra):
    return training.main(training.parse_args([*TINY_TOY, *extra, "--output_dir", str(output_dir)]))


def checkpoint_names(output_dir):
    return [p.name for p in training.list_checkpoints(output_dir)]


def assert_same_weights(expected_dir, actual_dir):
    expected, actual = load_file(expected_dir / WEIGHTS), load_file(actual_dir / WEIGHTS)
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name


@pytest.fixture(scope="module")
def twelve_steps(tmp_path_factory):
    """A run checkpointing every step up to 11 with a limit of 3: the checkpoints cross a digit-count boundary."""
    output_dir = tmp_path_factory.mktemp("twelve") / "moons"
    train(output_dir, "--max_train_steps", "12", "--checkpointing_steps", "1", "--checkpoints_total_limit", "3")
    return output_dir


def test_checkpoints_hold_safetensors_and_json_outside_the_pipeline_folder(twelve_steps):
    # numeric order across 9 -> 10 -> 11 (a string sort would keep 9 as the newest)
    assert checkpoint_names(twelve_steps) == ["checkpoint-9", "checkpoint-10", "checkpoint-11"]
    folder = training.checkpoints_dir(twelve_steps)
    assert folder == twelve_steps.parent / "moons-checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint-10", "checkpoint-11", "checkpoint-9",
                                                          "train.lock"]
    latest = folder / "checkpoint-11"
    assert sorted(p.name for p in latest.iterdir()) == [
        "ema.safetensors", "model.safetensors", "optimizer.safetensors", "random_states_0.safetensors",
        training.RUN_CONFIG_NAME, training.TRAINING_STATE_NAME]
    state = json.loads((latest / training.TRAINING_STATE_NAME).read_text())
    assert state["step"] == 11 and state["num_processes"] == 1 and state["format"] == 1
    assert state["lr_scheduler"]["last_epoch"] == 11 and state["ema"]["optimization_step"] == 11
    # AdamW's moments of every parameter and its step count, as trained
    optimizer = load_file(latest / "optimizer.safetensors")
    model = load_file(latest / "model.safetensors")
    assert len(optimizer) == 3 * len(model) and optimizer["state.0.step"].item() == 11
    # the pipeline folder holds only what a user shares
    assert sorted(str(p.relative_to(twelve_steps)) for p in twelve_steps.rglob("*") if p.is_file()
                  and not p.is_relative_to(twelve_steps / "logs")) == [
        "README.md", "model_index.json", "samples.png", "scheduler/scheduler_config.json",
        training.RUN_CONFIG_NAME, "unet/config.json", str(WEIGHTS)]

    args = training.parse_args([*TINY_TOY, "--resume_from_checkpoint", "latest", "--output_dir", str(twelve_steps)])
    contents = training.find_resume_checkpoint(args)
    assert contents.path == latest and contents.step == 11


def test_kill_between_writing_and_rotating_keeps_the_progress(tmp_path, monkeypatch, caplog):
    """With --checkpoints_total_limit 1, a run killed after writing checkpoint-4 but before removing checkpoint-2
    keeps both; resumed, it ends with the weights of an uninterrupted run."""
    options = ["--max_train_steps", "8", "--checkpointing_steps", "2", "--checkpoints_total_limit", "1"]
    train(tmp_path / "straight", *options)
    assert checkpoint_names(tmp_path / "straight") == ["checkpoint-6"]

    class Killed(BaseException):
        pass

    def killed_when_rotating(folder, limit):
        if len(training.list_checkpoints(folder)) > limit:
            raise Killed

    monkeypatch.setattr(checkpoints_module, "prune_checkpoints", killed_when_rotating)
    with pytest.raises(Killed):
        train(tmp_path / "killed", *options)
    assert checkpoint_names(tmp_path / "killed") == ["checkpoint-2", "checkpoint-4"]
    monkeypatch.undo()

    caplog.set_level("INFO", logger="diffusers_scorekit.training")
    train(tmp_path / "killed", *options, "--resume_from_checkpoint", "latest")
    assert "resumed from" in caplog.text and "checkpoint-4 at step 4" in caplog.text
    assert checkpoint_names(tmp_path / "killed") == ["checkpoint-6"]
    assert_same_weights(tmp_path / "straight", tmp_path / "killed")


@pytest.mark.parametrize("damaged, reason", [
    ("model.safetensors", "model.safetensors is damaged"),
    (training.TRAINING_STATE_NAME, "training_state.json is not valid JSON"),
    (training.RUN_CONFIG_NAME, "scorekit_training_config.json is damaged"),
])
def test_a_damaged_latest_checkpoint_falls_back_to_the_newest_intact_one(twelve_steps, tmp_path, damaged, reason,
                                                                          caplog):
    output_dir = tmp_path / "moons"
    shutil.copytree(training.checkpoints_dir(twelve_steps), training.checkpoints_dir(output_dir))
    path = training.checkpoints_dir(output_dir) / "checkpoint-11" / damaged
    path.write_bytes(path.read_bytes()[:-7])  # truncated
    args = training.parse_args([*TINY_TOY, "--resume_from_checkpoint", "latest", "--output_dir", str(output_dir)])
    contents = training.find_resume_checkpoint(args)
    assert contents.path.name == "checkpoint-10"
    assert f"skipping checkpoint {path.parent}: {path.parent}" in caplog.text and reason in caplog.text


def test_no_intact_checkpoint_is_an_error_not_a_restart(twelve_steps, tmp_path, capsys):
    output_dir = tmp_path / "moons"
    shutil.copytree(training.checkpoints_dir(twelve_steps), training.checkpoints_dir(output_dir))
    for checkpoint in training.list_checkpoints(output_dir):
        (checkpoint / "optimizer.safetensors").write_bytes(b"")
    argv = [*TINY_TOY, "--resume_from_checkpoint", "latest", "--output_dir", str(output_dir)]
    with pytest.raises(training.TrainingSetupError, match=r"none of the 3 checkpoints .* can be loaded "
                       r"\(checkpoint-11: .*optimizer.safetensors is damaged"):
        training.main(training.parse_args(argv))
    with pytest.raises(SystemExit, match="^error: --resume_from_checkpoint latest: none of the 3"):
        cli.main(["train", *argv])
    assert not (output_dir / WEIGHTS).exists()

    explicit = training.checkpoints_dir(output_dir) / "checkpoint-9"
    with pytest.raises(training.CorruptCheckpointError, match=f"--resume_from_checkpoint {explicit}: .*damaged"):
        training.find_resume_checkpoint(training.parse_args([*TINY_TOY, "--resume_from_checkpoint", str(explicit)]))


class Planted:
    """Unpickling it creates ``marker``: what a malicious pickle could do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_resuming_never_unpickles(twelve_steps, tmp_path, monkeypatch):
    """Pickles planted where accelerate keeps its state (custom objects, optimizer, random states) are never
    read: resuming uses safetensors and JSON only, and a folder with only pickles is refused."""
    marker = tmp_path / "pickle-ran"
    # the plant works: unpickling it runs code
    pickle.loads(pickle.dumps(Planted(tmp_path / "probe")))
    assert (tmp_path / "probe").exists()

    output_dir = tmp_path / "moons"
    shutil.copytree(training.checkpoints_dir(twelve_steps), training.checkpoints_dir(output_dir))
    latest = training.checkpoints_dir(output_dir) / "checkpoint-11"
    for name in ("custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl", "random_states_0.pkl", "optimizer.bin",
                 "pytorch_model.bin", "scheduler.bin"):
        torch.save(Planted(marker), latest / name)

    def refuse(*args, **kwargs):
        raise AssertionError("resuming must not unpickle anything")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    train(output_dir, "--max_train_steps", "13", "--checkpointing_steps", "1", "--checkpoints_total_limit", "3",
          "--resume_from_checkpoint", "latest")
    assert not marker.exists()
    assert json.loads((output_dir / training.RUN_CONFIG_NAME).read_text())["result"]["steps"] == 13

    pickles_only = tmp_path / "accelerate-format" / "checkpoint-5"
    pickles_only.mkdir(parents=True)
    (pickles_only / training.RUN_CONFIG_NAME).write_text("{}")
    torch.save(Planted(marker), pickles_only / "custom_checkpoint_0.pkl")
    with pytest.raises(training.CorruptCheckpointError, match="custom_checkpoint_0.pkl are pickles, which are "
                       "never loaded"):
        training.find_resume_checkpoint(training.parse_args([*TINY_TOY, "--resume_from_checkpoint",
                                                             str(pickles_only)]))
    assert not marker.exists()


def test_a_second_run_on_the_same_output_dir_is_refused(tmp_path):
    lock = training.RunLock(tmp_path / "moons").acquire()
    try:
        with pytest.raises(training.TrainingSetupError,
                           match=f"another training run is writing {tmp_path / 'moons'} "
                                 f"\\(it holds {tmp_path / 'moons-checkpoints' / 'train.lock'}\\)"):
            train(tmp_path / "moons", "--max_train_steps", "2")
    finally:
        lock.release()
    assert not (tmp_path / "moons" / WEIGHTS).exists()
    train(tmp_path / "moons", "--max_train_steps", "2")  # released: the next run goes ahead
    assert (tmp_path / "moons" / WEIGHTS).is_file()


@pytest.mark.parametrize("argv, message", [
    (["--max_train_steps", "-5"], "--max_train_steps must be >= 1, got -5"),
    (["--num_toy_samples", "0"], "--num_toy_samples must be >= 1, got 0"),
    (["--hidden_dim", "-1"], "--hidden_dim must be >= 1, got -1"),
    (["--lr_warmup_steps", "-1"], "--lr_warmup_steps must be >= 0, got -1"),
    (["--checkpoints_total_limit", "0"], "--checkpoints_total_limit must be >= 1, got 0"),
    (["--num_inference_steps", "0"], "--num_inference_steps must be >= 1, got 0"),
    (["--eval_likelihood_samples", "-3"], "--eval_likelihood_samples must be >= 0, got -3"),
    (["--num_threads", "0"], "--num_threads must be >= 1, got 0"),
    (["--block_out_channels", "8,-8"], "--block_out_channels must be positive, got 8,-8"),
    (["--ema_decay", "1"], "--ema_decay must be in (0, 1), got 1.0"),
    (["--ema_decay", "0"], "--ema_decay must be in (0, 1), got 0.0"),
    (["--max_grad_norm", "-1"], "--max_grad_norm must be >= 0 (0 disables clipping), got -1.0"),
    (["--sigma_max", "nan"], "--sigma_max must be a finite number, got nan"),
    (["--sigma_max", "0.001"], "--sigma_max must be > --sigma_min (0.01), got 0.001"),
    (["--beta_max", "inf"], "--beta_max must be a finite number, got inf"),
    (["--learning_rate", "0"], "--learning_rate must be > 0, got 0.0"),
    (["--adam_beta2", "1"], "--adam_beta2 must be in [0, 1), got 1.0"),
    (["--sampling_eps", "0"], "--sampling_eps must be in (0, 1), got 0.0"),
    (["--label_dropout", "1"], "--label_dropout must be in [0, 1), got 1.0"),
])
def test_out_of_range_arguments_end_with_a_message_not_a_traceback(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--dataset", "two_moons", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"error: {message}" in err and "Traceback" not in err


def test_an_output_dir_that_cannot_be_written_is_refused_before_training(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for output_dir, message in [(blocker, "is a file, not a folder"),
                                (blocker / "sub", f"cannot be created: {blocker} is a file")]:
        with pytest.raises(SystemExit):
            training.parse_args(["--dataset", "two_moons", "--output_dir", str(output_dir)])
        assert message in capsys.readouterr().err
    if os.geteuid() != 0:  # root may write anywhere
        read_only = tmp_path / "read-only"
        read_only.mkdir(mode=0o500)
        with pytest.raises(SystemExit):
            training.parse_args(["--dataset", "two_moons", "--output_dir", str(read_only / "out")])
        assert "no write permission" in capsys.readouterr().err


# --- the Hub -------------------------------------------------------------------------------------------------


def test_hub_access_is_checked_before_training(tmp_path, monkeypatch, caplog):
    import huggingface_hub
    from huggingface_hub import constants

    calls = []

    def no_network(self, *args, **kwargs):
        calls.append("whoami")
        raise ConnectionError("no network")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.HfApi, "whoami", no_network)
    argv = ["--max_train_steps", "2", "--push_to_hub", "--hub_model_id", "someone/moons"]
    with pytest.raises(training.TrainingSetupError, match="cannot reach the Hub .*ConnectionError: no network.*"
                       "`hf auth login`.*`hf upload someone/moons"):
        train(tmp_path / "moons", *argv)
    assert calls == ["whoami"] and not (tmp_path / "moons").exists()

    monkeypatch.setattr(huggingface_hub.HfApi, "whoami", lambda self, *a, **k: {
        "name": "someone", "auth": {"accessToken": {"role": "read"}}})
    with pytest.raises(training.TrainingSetupError, match="token of 'someone' is read-only"):
        train(tmp_path / "moons", *argv)

    # offline: no check, a warning, and the run trains (its push then fails, saying where the files are)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.HfApi, "whoami", no_network)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", no_network)
    with pytest.raises(RuntimeError, match="Nothing is lost"):
        train(tmp_path / "moons", *argv)
    assert calls == ["whoami", "whoami"] and "HF_HUB_OFFLINE is set" in caplog.text
    assert (tmp_path / "moons" / WEIGHTS).is_file()


def test_an_upload_sends_the_pipeline_and_its_card_only(twelve_steps, tmp_path, monkeypatch):
    """``push_to_hub`` through huggingface_hub's own upload_folder up to the commit: the operations hold the
    weights, configs, card and sample image, never checkpoints, pickles, previews or logs."""
    import huggingface_hub
    from huggingface_hub import CommitOperationAdd, RepoUrl

    folder = tmp_path / "moons"
    shutil.copytree(twelve_steps, folder)
    # what must never be sent, even if it ends up in the folder
    (folder / "checkpoint-3").mkdir()
    (folder / "checkpoint-3" / "optimizer.bin").write_bytes(b"pickle")
    (folder / "stray.pkl").write_bytes(b"pickle")
    (folder / "samples").mkdir()
    (folder / "samples" / "step-0000005.png").write_bytes(b"png")
    (folder / "logs").mkdir(exist_ok=True)
    (folder / "logs" / "events.out.tfevents").write_bytes(b"events")
    (folder / ".scorekit.lock").write_text("")
    commits = []

    def create_repo(self, repo_id, **kwargs):
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_commit(self, repo_id, operations, **kwargs):
        commits.append((repo_id, list(operations)))
        return huggingface_hub.CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/1",
                                          commit_message="", commit_description="", oid="1" * 40)

    validated = []
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", create_commit)
    # the Hub's YAML check of the card, the one other request of an upload
    monkeypatch.setattr(huggingface_hub.HfApi, "_validate_yaml", lambda self, content, **kw: validated.append(content))
    # the single-commit upload (with hf_xet installed, upload_folder streams batches of commits instead)
    monkeypatch.setattr(huggingface_hub.hf_api, "is_xet_available", lambda: False)
    args = training.parse_args([*TINY_TOY, "--push_to_hub", "--hub_model_id", "someone/moons",
                                "--output_dir", str(folder)])
    assert training.push_to_hub(args) == "someone/moons"
    (repo_id, operations), = commits
    assert repo_id == "someone/moons" and all(isinstance(op, CommitOperationAdd) for op in operations)
    assert sorted(op.path_in_repo for op in operations) == [
        "README.md", "model_index.json", "samples.png", "scheduler/scheduler_config.json",
        training.RUN_CONFIG_NAME, "unet/config.json", str(WEIGHTS)]

    assert validated == [(folder / "README.md").read_text()]
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "diffusers_scorekit" and card.data.license == "apache-2.0"
    assert card.data.to_dict()["tags"][:2] == ["score-based", "sde"]


def test_two_processes_with_torchrun_on_cpus(tmp_path):
    """torchrun's two processes join one run on the CPU (gloo) and say so; each writes its random states."""
    output_dir = tmp_path / "moons"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
         str(REPO_ROOT / "training" / "train_score_sde.py"), *TINY_TOY, "--max_train_steps", "4",
         "--checkpointing_steps", "2", "--report_to", "none", "--output_dir", str(output_dir)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es) on cpu, global batch 128 (64 per process x 2 process(es) x 1 accumulation" in result.stderr
    assert result.stderr.count("saved the pipeline and its model card") == 1
    assert sorted(p.name for p in (training.checkpoints_dir(output_dir) / "checkpoint-2").glob("random_states_*")) \
        == ["random_states_0.safetensors", "random_states_1.safetensors"]
    assert (output_dir / WEIGHTS).is_file()


# --- what a checkpoint records, and what resuming compares ---------------------------------------------------


def _saved_run_config(output_dir, checkpoint="checkpoint-11"):
    return json.loads((training.checkpoints_dir(output_dir) / checkpoint / training.RUN_CONFIG_NAME).read_text())


def test_the_run_config_records_the_model_the_sde_the_data_and_the_settings(twelve_steps):
    from diffusers_scorekit import ScoreSDEPipeline

    saved = _saved_run_config(twelve_steps)
    args = training.parse_args([*TINY_TOY, "--max_train_steps", "12", "--output_dir", str(twelve_steps)])
    unet = ScoreSDEPipeline.from_pretrained(twelve_steps).unet
    assert saved["model"] == {"class": "ScoreMLP", "config": json.loads(json.dumps(
        {key: value for key, value in unet.config.items() if not key.startswith("_")}))}
    assert saved["model"]["config"]["hidden_dim"] == 32 and saved["model"]["config"]["num_layers"] == 2
    assert saved["sde"] == training.sde_config(args)
    data = training.load_data(args)
    assert saved["data"] == {"description": data.description, "normalization": data.normalization,
                             "class_names": data.class_names}
    assert {"dataset": "two_moons", "num_toy_samples": 2000, "train_batch_size": 64, "lr_warmup_steps": 5,
            "use_ema": True, "seed": args.seed}.items() <= saved["training"].items()
    assert set(training.SPEED_SWITCHES) <= set(saved["training"])


def test_resuming_refuses_a_different_model_or_sde_and_names_every_difference(twelve_steps):
    checkpoint = training.checkpoints_dir(twelve_steps) / "checkpoint-11"
    current = _saved_run_config(twelve_steps)
    current["model"]["class"] = "NCSNScoreModel"
    current["model"]["config"]["hidden_dim"] = 16
    current["model"]["config"]["added"] = 1
    current["model"]["config"]["num_layers"] = {"blocks": 2}  # a dict on one side only is a plain difference
    with pytest.raises(ValueError, match=r"^cannot resume from .*checkpoint-11: its model differs from this run's "
                       r"\(class: checkpoint 'ScoreMLP', now 'NCSNScoreModel'; config\.added: checkpoint None, now 1; "
                       r"config\.hidden_dim: checkpoint 32, now 16; config\.num_layers: checkpoint 2, now \{'blocks': 2\}\)\.$"):
        training.check_resumable(checkpoint, current)

    current = _saved_run_config(twelve_steps)
    current["sde"]["sigma_max"] = 7.0
    with pytest.raises(ValueError, match=r"its sde differs from this run's \(sigma_max: checkpoint [0-9.]+, now 7\.0\)"):
        training.check_resumable(checkpoint, current)


def test_resuming_with_other_training_settings_warns_with_each_of_them(twelve_steps, caplog):
    checkpoint = training.checkpoints_dir(twelve_steps) / "checkpoint-11"
    current = _saved_run_config(twelve_steps)
    training.check_resumable(checkpoint, current)
    assert "different training settings" not in caplog.text

    current["training"]["learning_rate"] = 0.5
    current["training"]["seed"] = 99
    training.check_resumable(checkpoint, current)
    saved = _saved_run_config(twelve_steps)["training"]
    assert (f"with different training settings (learning_rate: checkpoint {saved['learning_rate']!r}, now 0.5; "
            f"seed: checkpoint {saved['seed']!r}, now 99)") in caplog.text


@pytest.mark.parametrize("pickle_name", ["optimizer.bin", "model.pt", "states.pkl"])
def test_a_folder_of_pickles_is_refused_whatever_their_suffix(tmp_path, pickle_name):
    folder = tmp_path / "checkpoint-3"
    folder.mkdir()
    (folder / pickle_name).write_bytes(b"not read")
    (folder / "notes.txt").write_text("not a pickle")
    with pytest.raises(training.CorruptCheckpointError, match=rf"training_state.json is missing; {pickle_name} are "
                       r"pickles, which are never loaded$"):
        training.read_checkpoint(folder)


@pytest.mark.parametrize("state", [{"format": 2, "files": {}, "step": 3}, {"format": 1, "step": 3}, [1]])
def test_a_training_state_of_another_format_is_refused(tmp_path, state):
    folder = tmp_path / "checkpoint-3"
    folder.mkdir()
    (folder / training.TRAINING_STATE_NAME).write_text(json.dumps(state))
    with pytest.raises(training.CorruptCheckpointError, match="is not a checkpoint description of format 1$"):
        training.read_checkpoint(folder)


def test_checkpoints_are_the_numbered_folders_in_numeric_order(tmp_path):
    folder = training.checkpoints_dir(tmp_path / "run")
    for name in ("checkpoint-10", "checkpoint-2", "checkpoint-x", ".checkpoint-3.partial", "notacheckpo12"):
        (folder / name).mkdir(parents=True)
    (folder / "checkpoint-7").write_text("a file, not a checkpoint")
    (folder / "abcdefghijk5").write_text("neither")
    assert checkpoint_names(tmp_path / "run") == ["checkpoint-2", "checkpoint-10"]


def test_a_stale_partial_folder_and_a_damaged_checkpoint_of_the_same_step_are_replaced(twelve_steps, tmp_path):
    """A run killed while saving leaves ``.checkpoint-N.partial``; one resumed past a damaged ``checkpoint-N``
    writes that step again: both are replaced, not an error."""
    output_dir = tmp_path / "moons"
    folder = training.checkpoints_dir(output_dir)
    shutil.copytree(training.checkpoints_dir(twelve_steps), folder)
    (folder / "checkpoint-11" / "model.safetensors").write_bytes(b"damaged")
    (folder / ".checkpoint-11.partial").mkdir()
    (folder / ".checkpoint-11.partial" / "left-over").write_text("from the killed run")
    train(output_dir, "--max_train_steps", "12", "--checkpointing_steps", "1", "--checkpoints_total_limit", "3",
          "--resume_from_checkpoint", "latest")
    # the last step is saved as the pipeline, not as a checkpoint
    assert checkpoint_names(output_dir) == ["checkpoint-9", "checkpoint-10", "checkpoint-11"]
    assert training.read_checkpoint(folder / "checkpoint-11").step == 11
    assert not (folder / "checkpoint-11" / "left-over").exists() and not list(folder.glob(".checkpoint-*"))


def _loaded_training_state(checkpoint):
    import accelerate

    args = training.parse_args([*TINY_TOY, "--output_dir", str(checkpoint.parent.parent / "unused")])
    training.resolve_speed(args, torch.device("cpu"))
    data = training.load_data(args)
    model = training.build_model(args, data)
    accelerator = accelerate.Accelerator(cpu=True)
    return accelerator, training.prepare_training(args, accelerator, model, training.training_sde(args))


def test_loading_a_checkpoint_restores_this_process_random_state(twelve_steps):
    contents = training.read_checkpoint(training.checkpoints_dir(twelve_steps) / "checkpoint-11")
    accelerator, state = _loaded_training_state(contents.path)
    torch.manual_seed(12345)
    assert training.load_checkpoint(contents, accelerator, state) == 11
    assert torch.equal(torch.get_rng_state(), contents.tensors["random_states_0"]["torch_cpu"])


def test_random_states_of_another_process_count_are_not_restored(twelve_steps, caplog):
    contents = training.read_checkpoint(training.checkpoints_dir(twelve_steps) / "checkpoint-11")
    contents.state["num_processes"] = 2
    accelerator, state = _loaded_training_state(contents.path)
    torch.manual_seed(12345)
    before = torch.get_rng_state()
    training.load_checkpoint(contents, accelerator, state)
    assert torch.equal(torch.get_rng_state(), before)
    assert "was written by 2 process(es), this run has 1: the random states are not restored" in caplog.text


def test_the_run_lock_writes_this_pid_alone_and_releases_safely(tmp_path):
    nested = tmp_path / "not" / "yet" / "made"
    lock = training.RunLock(nested)
    lock.release()  # never acquired: nothing to release
    lock.path.parent.mkdir(parents=True)
    lock.path.write_text("99999999 a stale pid from an earlier run\n")
    lock.acquire()
    assert lock.path.read_text() == f"{os.getpid()}\n"
    second = training.RunLock(nested)
    with pytest.raises(training.TrainingSetupError):
        second.acquire()
    second.release()  # a refused lock holds nothing
    lock.release()
    lock.release()
    assert training.RunLock(tmp_path / "a" / "b").acquire().path.is_file()  # its parents are made
