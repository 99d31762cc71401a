"""Training data through ``datasets`` (image folders, ``save_to_disk`` folders, streams), exact resume with
DataLoader workers, and sampling over two CPU processes (tiny 8-px images, a few steps)."""

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from diffusers_scorekit import NCSNScoreModel, PredictorCorrectorScheduler, ScoreSDEPipeline, cli, training
from diffusers_scorekit.distributed_sampling import process_batches

datasets = pytest.importorskip("datasets")
pytest.importorskip("torchvision")

REPO_ROOT = Path(__file__).resolve().parent.parent
TRAIN_SCRIPT = REPO_ROOT / "training" / "train_score_sde.py"
WEIGHTS = Path("unet") / "diffusion_pytorch_model.safetensors"
TINY_IMAGES = ["--resolution", "8", "--block_out_channels", "8,8", "--train_batch_size", "4", "--lr_warmup_steps", "2",
               "--num_inference_steps", "2", "--num_eval_samples", "4", "--eval_likelihood_samples", "0"]


def environment(tmp_path, **extra):
    # no network, and datasets' cache inside the test's folder
    return dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1", HF_DATASETS_OFFLINE="1",
                HF_HUB_OFFLINE="1", HF_DATASETS_CACHE=str(tmp_path / "hf-cache"), **extra)


def run(command, tmp_path, **extra):
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                          env=environment(tmp_path, **extra))


def train(tmp_path, *args, **extra):
    return run([sys.executable, str(TRAIN_SCRIPT), *TINY_IMAGES, *args], tmp_path, **extra)


def image_folder(root: Path, sizes=((10, 14), (12, 9), (8, 8)), per_class: int = 4) -> Path:
    """Small RGB PNGs of several sizes in two class subfolders."""
    rng = np.random.default_rng(0)
    for label in ("cats", "dogs"):
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            height, width = sizes[i % len(sizes)]
            Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(root / label / f"{i}.png")
    return root


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--dataset", "imagefolder"], "--dataset imagefolder reads --train_data_dir"),
        (["--train_data_dir", "x", "--center_crop", "--random_crop"], "exclude each other"),
        (["--dataset", "two_moons", "--streaming"], "--streaming streams --train_data_dir or --dataset_name"),
        (["--train_data_dir", "x", "--dataloader_num_workers", "-1"], "--dataloader_num_workers must be >= 0"),
    ],
)
def test_bad_data_options_are_rejected(argv, message, capsys):
    with pytest.raises(SystemExit):
        training.parse_args(argv)
    assert message in capsys.readouterr().err


def test_transforms_draw_from_the_generator_only():
    """Crops and flips are torchvision v2 ops whose offsets come from the micro-batch's generator: a 2x4 image
    resized (short side 2) and cropped at a random offset in 0..2, then flipped, in exactly the drawn order."""
    pixels = np.arange(8, dtype=np.uint8).reshape(2, 4) * 10
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    encoded = {"bytes": buffer.getvalue(), "path": None}
    generator = torch.Generator().manual_seed(5)
    images = training.transform_images([encoded] * 6, 1, 2, "random", True, generator)
    replay = torch.Generator().manual_seed(5)
    for image in images:
        top = int(torch.randint(1, (), generator=replay))
        left = int(torch.randint(3, (), generator=replay))
        expected = torch.from_numpy(pixels[top:top + 2, left:left + 2])[None]
        if torch.rand((), generator=replay) < 0.5:
            expected = expected.flip(-1)
        assert torch.equal(image, expected)
    # the held-out (generator-free) transform is the centre crop, unflipped
    centre = training.transform_images([encoded], 1, 2, "random", True, None)
    assert torch.equal(centre[0, 0], torch.from_numpy(pixels[:, 1:3]))


def test_image_folder_and_saved_dataset_train_through_the_script(tmp_path):
    """``--train_data_dir`` (datasets' imagefolder, class subfolders as labels, random crops and flips, 2 workers)
    and the same images written by ``save_to_disk`` as ``--dataset_name``: same batches, so the same weights."""
    folder = image_folder(tmp_path / "images")
    options = ["--random_crop", "--random_flip", "--num_classes", "2", "--max_train_steps", "3",
               "--checkpointing_steps", "10"]
    from_folder = train(tmp_path, "--dataset", "imagefolder", "--train_data_dir", str(folder), *options,
                        "--dataloader_num_workers", "2", "--output_dir", str(tmp_path / "folder"))
    assert from_folder.returncode == 0, from_folder.stderr[-3000:]
    assert "the image folder `images` (8 images, 8 px)" in from_folder.stderr

    saved = datasets.load_dataset("imagefolder", data_dir=str(folder), split="train", cache_dir=str(tmp_path / "c"))
    saved.save_to_disk(str(tmp_path / "saved"))
    from_disk = train(tmp_path, "--dataset_name", str(tmp_path / "saved"), *options,
                      "--output_dir", str(tmp_path / "disk"))
    assert from_disk.returncode == 0, from_disk.stderr[-3000:]
    assert "the saved dataset `saved` (8 images, 8 px)" in from_disk.stderr

    pipe = ScoreSDEPipeline.from_pretrained(tmp_path / "disk")
    assert pipe.sample_shape == (3, 8, 8) and pipe.unet.config.num_class_embeds == 2
    expected, actual = load_file(tmp_path / "folder" / WEIGHTS), load_file(tmp_path / "disk" / WEIGHTS)
    assert all(torch.equal(expected[name], actual[name]) for name in expected)


def test_batches_do_not_depend_on_the_number_of_workers(tmp_path):
    folder = image_folder(tmp_path / "images")
    args = training.parse_args(["--train_data_dir", str(folder), "--cache_dir", str(tmp_path / "c"),
                                "--random_crop", "--random_flip", *TINY_IMAGES])
    data = training.load_data(args)
    assert data.source is not None and data.example_shape == (3, 8, 8) and data.class_names == ["cats", "dogs"]
    batches = {}
    for workers in (0, 2):
        args.dataloader_num_workers = workers
        stream = training.training_batches(args, data, 1, 0, start=3)
        batches[workers] = [next(stream) for _ in range(4)]
    for (images0, labels0), (images2, labels2) in zip(batches[0], batches[2]):
        assert torch.equal(images0, images2) and torch.equal(labels0, labels2)
    # micro-batch 3 onwards of a run started at 0, element for element
    args.dataloader_num_workers = 0
    from_start = training.training_batches(args, data, 1, 0, start=0)
    assert torch.equal([next(from_start) for _ in range(4)][3][0], batches[0][0][0])
    # an epoch (2 micro-batches of 4) is a permutation of the 8 images
    labels = torch.cat([labels for _, labels in batches[0][1:3]])
    assert sorted(labels.tolist()) == [0] * 4 + [1] * 4


def test_killed_run_with_workers_resumes_to_identical_weights(tmp_path):
    """SIGKILL after step 5 (checkpoint at 4), resume: the weights of an uninterrupted run, bit for bit, with
    random crops and flips made in 2 DataLoader workers."""
    folder = image_folder(tmp_path / "images")
    options = ["--train_data_dir", str(folder), "--random_crop", "--random_flip", "--max_train_steps", "7",
               "--checkpointing_steps", "4", "--dataloader_num_workers", "2", "--gradient_accumulation_steps", "2"]
    # uninterrupted in this process, interrupted in a subprocess (SIGKILL), then resumed in one
    training.main(training.parse_args([*TINY_IMAGES, *options, "--cache_dir", str(tmp_path / "c"),
                                       "--output_dir", str(tmp_path / "straight")]))
    killed = train(tmp_path, *options, "--output_dir", str(tmp_path / "killed"),
                   **{training.KILL_AT_STEP_ENV: "5"})
    assert killed.returncode == -9, killed.stderr[-3000:]
    resumed = train(tmp_path, *options, "--output_dir", str(tmp_path / "killed"), "--resume_from_checkpoint",
                    "latest")
    assert resumed.returncode == 0 and "checkpoint-4" in resumed.stderr, resumed.stderr[-3000:]
    expected, actual = load_file(tmp_path / "straight" / WEIGHTS), load_file(tmp_path / "killed" / WEIGHTS)
    assert all(torch.equal(expected[name], actual[name]) for name in expected)


@pytest.mark.slow
def test_streamed_run_resumes_from_its_saved_stream_state(tmp_path):
    """A stream (7 images, batches of 4: one batch per epoch, the 7th image dropped) killed after step 3 and
    resumed from checkpoint 2 (stream state as JSON): the weights of an uninterrupted streamed run."""
    folder = image_folder(tmp_path / "images", per_class=4)
    (folder / "dogs" / "3.png").unlink()
    options = ["--train_data_dir", str(folder), "--streaming", "--random_flip", "--max_train_steps", "4",
               "--checkpointing_steps", "2", "--gradient_accumulation_steps", "1"]
    straight = train(tmp_path, *options, "--output_dir", str(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert "(streamed, 8 px)" in straight.stderr
    killed = train(tmp_path, *options, "--output_dir", str(tmp_path / "killed"), **{training.KILL_AT_STEP_ENV: "3"})
    assert killed.returncode == -9, killed.stderr[-3000:]
    state = training.read_data_state(tmp_path / "killed" / "checkpoint-2", 0)
    assert state["epoch"] == 1 and state["micro_batch"] == 2 and "stream" in state
    assert not list((tmp_path / "killed" / "checkpoint-2").glob("data_state*.pkl"))
    resumed = train(tmp_path, *options, "--output_dir", str(tmp_path / "killed"), "--resume_from_checkpoint",
                    "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected, actual = load_file(tmp_path / "straight" / WEIGHTS), load_file(tmp_path / "killed" / WEIGHTS)
    assert all(torch.equal(expected[name], actual[name]) for name in expected)


def test_stream_batches_follow_the_stream(tmp_path):
    """The stream is read in its order, epoch after epoch, 4 images a batch; a state restores the position."""
    pixels = [np.full((8, 8), value, dtype=np.uint8) for value in range(0, 90, 10)]
    dataset = datasets.Dataset.from_dict({"image": [Image.fromarray(p) for p in pixels]},
                                         features=datasets.Features({"image": datasets.Image()}))
    dataset.save_to_disk(str(tmp_path / "nine"))
    args = training.parse_args(["--dataset_name", str(tmp_path / "nine"), "--streaming", *TINY_IMAGES])
    data = training.load_data(args)
    assert data.source.streaming and data.example_shape == (1, 8, 8)
    batches = training.training_batches(args, data, 1, 0, start=0)
    firsts = [int(next(batches)[0][:, 0, 0, 0].tolist()[0]) for _ in range(3)]
    assert firsts == [0, 40, 0]  # 9 images: batches 0-3, 4-7, then the next epoch (the 9th is dropped)
    assert batches.state_dict()["epoch"] == 1
    (tmp_path / "ckpt").mkdir()
    training.write_data_state(tmp_path / "ckpt", 0, batches)
    again = training.training_batches(args, data, 1, 0, start=3, checkpoint=tmp_path / "ckpt")
    assert torch.equal(next(again)[0], next(batches)[0])
    with pytest.raises(FileNotFoundError, match="data_state_0.json"):
        training.training_batches(args, data, 1, 0, start=3, checkpoint=tmp_path)


def tiny_pipeline(folder: Path) -> Path:
    torch.manual_seed(0)
    unet = NCSNScoreModel(in_channels=1, sample_size=8, block_out_channels=(8, 16), norm_num_groups=4,
                          embedding_dim=16)
    ScoreSDEPipeline(unet, PredictorCorrectorScheduler(sigma_max=10.0)).save_pretrained(folder)
    return folder


def test_sample_batches_are_split_over_processes():
    assert process_batches(10, 3, 2, 0) == [range(0, 3), range(6, 9)]
    assert process_batches(10, 3, 2, 1) == [range(3, 6), range(9, 10)]
    assert process_batches(2, 3, 2, 1) == []


def test_two_processes_sample_the_same_images_as_one(tmp_path, capsys):
    """``scorekit sample`` under ``accelerate launch`` with 2 CPU processes writes one NPZ whose image i is bit for
    bit the one a single process makes (into an NPZ or a folder of PNGs)."""
    pipeline = tiny_pipeline(tmp_path / "pipe")
    sample = ["sample", str(pipeline), "--num_images", "7", "--batch_size", "2", "--num_inference_steps", "3"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the launched processes (OMP_NUM_THREADS=1)
    try:
        cli.main([*sample, "--output", str(tmp_path / "one.npz")])
        cli.main([*sample, "--output", str(tmp_path / "images")])
    finally:
        torch.set_num_threads(threads)
    assert "1 process(es)" in capsys.readouterr().out
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    double = run([*launch, "-m", "diffusers_scorekit.cli", *sample, "--output", str(tmp_path / "two.npz")], tmp_path,
                 ACCELERATE_USE_CPU="1")
    assert double.returncode == 0, double.stderr[-3000:]
    assert "2 process(es)" in double.stdout
    one, two = np.load(tmp_path / "one.npz")["images"], np.load(tmp_path / "two.npz")["images"]
    assert one.shape == (7, 8, 8, 1) and one.dtype == np.uint8
    assert np.array_equal(one, two)
    assert len(np.unique(one.reshape(7, -1), axis=0)) == 7  # every image has its own noise
    written = sorted((tmp_path / "images").iterdir())
    assert [p.name for p in written] == [f"{i:06d}.png" for i in range(7)]
    assert np.array_equal(np.asarray(Image.open(written[5]))[..., None], two[5])


def test_two_processes_fit_the_same_grid_and_sample_what_one_process_does(tmp_path):
    """``scorekit sample --calibrate`` under ``accelerate launch`` with 2 CPU processes: each fits the levels on the
    same pilot draws, so the images are bit for bit one process's, and the fit is reported once."""
    pipeline = tiny_pipeline(tmp_path / "pipe")
    sample = ["-m", "diffusers_scorekit.cli", "sample", str(pipeline), "--scheduler", "ProbabilityFlowODEScheduler",
              "--calibrate", "--num_images", "5", "--batch_size", "2", "--num_inference_steps", "3"]
    single = run([sys.executable, *sample, "--output", str(tmp_path / "one.npz")], tmp_path)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    double = run([*launch, *sample, "--output", str(tmp_path / "two.npz")], tmp_path, ACCELERATE_USE_CPU="1")
    assert single.returncode == 0 and double.returncode == 0, (single.stderr + double.stderr)[-3000:]
    assert "2 process(es)" in double.stdout and double.stdout.count("fitted 3 levels to the model") == 1
    fit_line = next(line for line in single.stdout.splitlines() if line.startswith("fitted"))
    assert fit_line in double.stdout.splitlines()  # the same distances and number of grids
    one, two = np.load(tmp_path / "one.npz")["images"], np.load(tmp_path / "two.npz")["images"]
    assert one.shape == (5, 8, 8, 1) and np.array_equal(one, two)
