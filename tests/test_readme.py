"""Every code block of README.md, run or checked, so the README cannot drift from the code.

How blocks are tested:

* ```` ```python ```` blocks are executed, each in a fresh namespace, in a temporary working directory, offline
  (``HF_HUB_OFFLINE=1``). Tracebacks and failure messages give README.md line numbers.
* The placeholder paths of ``PLACEHOLDER_FOLDERS`` (``"path/to/a/ddpm"``, ``"user/repo"``,
  ``"outputs/scorekit-demo"``), written as string literals, are replaced by tiny local pipeline folders the test
  builds (a DDPMPipeline, an image ScoreSDEPipeline, a vector ScoreSDEPipeline like the demo's).
* A block that stands alone (imports what it uses, loads a placeholder folder) needs nothing more. A block that
  uses names from its surroundings (``model``, ``scheduler``, ``pipe``, ...) declares its setup in an HTML
  comment (invisible on GitHub) on the line before its fence::

      <!-- readme-test: setup=plain_loop -->
      ```python

  The setups are the functions registered in ``SETUPS`` below (each says what it provides); add one there for a
  new kind of block. A setup may also shrink sizes (``rewrites``: exact source text -> what the test runs, such
  as a smaller batch) and check the block's results (``check``).
* ```` ```bash ```` blocks are checked, not run (they train for minutes): ``scorekit ...`` command lines are
  parsed by the CLI's own parsers (``scorekit train`` by the training parser, with its argument checks); a
  command that runs a repository ``*.py`` script (``python x.py``, ``accelerate launch x.py``, ``torchrun
  x.py``) or ``python -m module`` has its arguments parsed by that script's argparse parser (the script stops
  right after parsing); ``make TARGET`` must name a Makefile target. Other commands are not checked. ``[...]``
  around optional arguments is accepted (the arguments inside are checked too).
"""

import argparse
import contextlib
import os
import re
import runpy
import shlex
import sys
import textwrap
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List
from unittest import mock

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from diffusers_scorekit import (
    NCSNScoreModel,
    PredictorCorrectorScheduler,
    ScoreMLP,
    ScoreSDEPipeline,
    VEEulerMaruyamaScheduler,
    cli,
    training,
)
from diffusers_scorekit.metrics import FASHION_MNIST_DIR, FASHION_MNIST_FILES

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
FENCE = re.compile(r"^(\s*)```(\w*)\s*$")
SETUP_COMMENT = re.compile(r"<!--\s*readme-test:\s*setup=(\w+)\s*-->")


@dataclass
class Block:
    language: str
    line: int  # README line of the first code line
    code: str  # dedented
    setup: str = None


def readme_blocks() -> List[Block]:
    lines = README.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening or not opening.group(2):
            i += 1
            continue
        previous = next((line for line in reversed(lines[:i]) if line.strip()), "")
        setup = SETUP_COMMENT.search(previous)
        end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
        code = textwrap.dedent("\n".join(lines[i + 1:end]))
        blocks.append(Block(opening.group(2), i + 2, code, setup.group(1) if setup else None))
        i = end + 1
    return blocks


BLOCKS = readme_blocks()
PYTHON_BLOCKS = [block for block in BLOCKS if block.language == "python"]
BASH_BLOCKS = [block for block in BLOCKS if block.language in ("bash", "sh", "shell")]


# --- tiny local stand-ins for the README's paths ---------------------------------------------------------------


def tiny_ncsn(sample_size=8):
    torch.manual_seed(0)
    return NCSNScoreModel(in_channels=1, sample_size=sample_size, block_out_channels=(8, 16), norm_num_groups=4,
                          layers_per_block=1)


def tiny_mlp():
    torch.manual_seed(0)
    return ScoreMLP(data_dim=2, hidden_dim=16, num_layers=1, embedding_dim=16)


def build_ddpm(folder):
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), layers_per_block=1,
    )
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(folder)


def build_image_pipeline(folder):
    ScoreSDEPipeline(unet=tiny_ncsn(), scheduler=PredictorCorrectorScheduler()).save_pretrained(folder)


def build_vector_pipeline(folder):
    ScoreSDEPipeline(unet=tiny_mlp(), scheduler=PredictorCorrectorScheduler()).save_pretrained(folder)


# placeholder path in the README -> builder of the tiny folder that replaces it
PLACEHOLDER_FOLDERS = {
    "path/to/a/ddpm": build_ddpm,
    "user/repo": build_image_pipeline,
    "outputs/scorekit-demo": build_vector_pipeline,
}


@pytest.fixture(scope="module")
def placeholder_folders(tmp_path_factory) -> Dict[str, str]:
    root = tmp_path_factory.mktemp("readme_models")
    folders = {}
    for placeholder, build in PLACEHOLDER_FOLDERS.items():
        folder = root / placeholder.replace("/", "_")
        build(folder)
        folders[placeholder] = str(folder)
    return folders


# --- setups for blocks that use names from their surroundings -------------------------------------------------


@dataclass
class Setup:
    namespace: dict
    rewrites: Dict[str, str] = field(default_factory=dict)  # exact source text -> what the test runs instead
    check: Callable[[dict], None] = lambda namespace: None


SETUPS = {}


def setup(function):
    SETUPS[function.__name__] = contextlib.contextmanager(function)
    return function


@setup
def plain_loop(folders):
    """``torch``, ``model`` (a tiny ScoreMLP), ``scheduler`` (VE Euler-Maruyama), ``n``, ``shape``, ``g``."""

    def check(namespace):
        assert namespace["x"].shape == namespace["shape"] and torch.isfinite(namespace["x"]).all()

    yield Setup({"torch": torch, "model": tiny_mlp(), "scheduler": VEEulerMaruyamaScheduler(), "n": 10,
                 "shape": (8, 2), "g": torch.Generator().manual_seed(0)}, check=check)


@setup
def compiled_loop(folders):
    """``plain_loop``'s names and ``x``, an initial sample. ``torch.compile`` runs with dynamo's eager backend
    (the whole-graph capture, where graph breaks and autograd errors show; the scheduler tests compile the loop
    with aot_eager) on 4 steps rather than 50, which keep a CPU busy for minutes."""
    namespace = next(plain_loop(folders)).namespace
    scheduler = namespace["scheduler"]
    namespace["x"] = torch.randn(namespace["shape"], generator=namespace["g"]) * scheduler.init_noise_sigma
    real_compile = torch.compile

    def eager_compile(function, **options):
        options.pop("mode", None)
        return real_compile(function, **options, backend="eager")

    def check(namespace):
        assert namespace["samples"].shape == namespace["shape"] and torch.isfinite(namespace["samples"]).all()

    torch._dynamo.reset()
    with mock.patch.object(torch, "compile", eager_compile):
        yield Setup(namespace, rewrites={"set_timesteps(50)": "set_timesteps(4)"}, check=check)


@setup
def image_pipeline(folders):
    """``pipe``, the tiny 8 x 8 image ScoreSDEPipeline of ``"user/repo"`` with its output layer scaled down (a
    smooth flow: the adaptive ODE solves take tens of steps, not a thousand); ``images``, two PIL images it drew;
    ``x``, a batch of two images in the model's [-1, 1]."""
    pipe = ScoreSDEPipeline.from_pretrained(folders["user/repo"])
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        pipe.unet.conv_out.weight.mul_(1e-3)
        pipe.unet.conv_out.bias.zero_()
    images = pipe(batch_size=2, num_inference_steps=3, generator=torch.manual_seed(0)).images
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1

    def check(namespace):
        assert torch.isfinite(namespace["result"].bits_per_dim).all()
        torch.testing.assert_close(namespace["x_back"], x, atol=1e-2, rtol=0)  # decode inverts encode

    yield Setup({"torch": torch, "pipe": pipe, "images": images, "x": x},
                rewrites={"sample_adaptive(16,": "sample_adaptive(2,"}, check=check)


@setup
def fashion_mnist_pipeline(folders):
    """``pipe``, an untrained 28 x 28 image ScoreSDEPipeline; draws 16 images rather than 10,000 (needs Debian's
    dataset-fashion-mnist for the reference statistics)."""
    if not all((Path(FASHION_MNIST_DIR) / name).is_file() for name in FASHION_MNIST_FILES["test"]):
        pytest.skip(f"Fashion-MNIST test files are not in {FASHION_MNIST_DIR} (Debian's dataset-fashion-mnist)")
    pipe = ScoreSDEPipeline(unet=tiny_ncsn(sample_size=28), scheduler=PredictorCorrectorScheduler())
    pipe.set_progress_bar_config(disable=True)

    def check(namespace):
        assert namespace["images"].shape == (16, 1, 28, 28)

    yield Setup({"torch": torch, "pipe": pipe},
                rewrites={"batch_size=10_000, ": "batch_size=16, num_inference_steps=2, "}, check=check)


@setup
def calibration(folders):
    """Nothing but the block's own imports (the block runs in a temporary folder); the pilot batch is 8 draws and
    the search stops after 30 grids."""

    def check(namespace):
        calibration = namespace["calibration"]
        assert len(namespace["images"]) == 16 and len(calibration.sigmas) == 10
        assert calibration.distance < calibration.default_distance
        saved = ScoreSDEPipeline.from_pretrained("my-model").scheduler
        assert saved.config.fitted_sigmas == [calibration.sigmas]

    yield Setup({}, rewrites={"num_samples=64,": "num_samples=8, max_grids=30,"}, check=check)


@setup
def none(folders):
    """Nothing: the block stands alone."""
    yield Setup({})


# --- running a python block -------------------------------------------------------------------------------------


def block_id(block):
    return f"README.md:{block.line}"


def substitute_placeholders(code: str, folders: Dict[str, str]) -> str:
    for placeholder, folder in folders.items():
        for quote in ('"', "'"):
            code = code.replace(f"{quote}{placeholder}{quote}", repr(folder))
    return code


def fail_at(block, message):
    pytest.fail(f"README.md line {block.line} ({block.language} block): {message}", pytrace=False)


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=block_id)
def test_python_block_runs(block, placeholder_folders, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    name = block.setup or "none"
    if name not in SETUPS:
        fail_at(block, f"unknown setup {name!r}; the setups are {sorted(SETUPS)} (tests/test_readme.py)")
    with SETUPS[name](placeholder_folders) as prepared:
        code = substitute_placeholders(block.code, placeholder_folders)
        for old, new in prepared.rewrites.items():
            if old not in code:
                fail_at(block, f"setup {name!r} rewrites {old!r}, which the block no longer contains")
            code = code.replace(old, new)
        # padded so that line numbers in tracebacks are README.md's
        compiled = compile("\n" * (block.line - 1) + code, str(README), "exec")
        namespace = dict(prepared.namespace, __name__="readme_block")
        try:
            exec(compiled, namespace)
            prepared.check(namespace)
            failure = None
        except Exception as error:
            trace = "".join(traceback.format_exception(type(error), error, error.__traceback__, limit=-8))
            failure = f"{type(error).__name__}: {error}\n{trace}"
    if failure:
        fail_at(block, failure)


def test_every_setup_is_used():
    """A setup no block names is dead code (or a block lost its comment)."""
    used = {block.setup for block in PYTHON_BLOCKS} | {"none"}
    assert set(SETUPS) <= used, f"unused setups: {sorted(set(SETUPS) - used)}"


# --- checking a bash block --------------------------------------------------------------------------------------


class ArgumentsParsed(Exception):
    """Raised right after a script's parser accepted its arguments, so the script does no work."""


def command_lines(block) -> List[tuple]:
    """``(README line, words)`` for each command of a bash block: continuations joined, comments dropped,
    split at ``&&``, ``||``, ``;`` and ``|``, ``[`` ``]`` around optional arguments removed."""
    commands, pending, start = [], "", None
    for offset, line in enumerate(block.code.splitlines()):
        if start is None:
            start = block.line + offset
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        lexer = shlex.shlex(pending + line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split, lexer.commenters = True, "#"
        words = []
        for token in list(lexer) + [";"]:
            if token in (";", "&&", "||", "|", "&"):
                if words:
                    commands.append((start, words))
                words = []
            elif token.strip("[]"):
                words.append(token.strip("[]"))
        pending, start = "", None
    return commands


def parse_script_arguments(run, argv):
    """Run a script or module with ``argv`` until its argparse parser has accepted them."""
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(parser, args=None, namespace=None):
        original(parser, args, namespace)
        raise ArgumentsParsed

    with mock.patch.object(argparse.ArgumentParser, "parse_args", parse_then_stop), \
            mock.patch.object(sys, "argv", argv):
        try:
            run()
        except ArgumentsParsed:
            return
    raise AssertionError(f"{argv[0]} finished without parsing its arguments with argparse")


def check_command(words):
    while words and re.fullmatch(r"\w+=\S*", words[0]):  # VAR=value prefixes
        words = words[1:]
    if not words:
        return
    if words[0] == "scorekit":
        if words[1:2] == ["train"]:
            training.parse_args(words[2:])
        else:
            cli.build_parser().parse_args(words[1:])
        return
    if words[0] == "make":
        makefile = (ROOT / "Makefile").read_text()
        for target in (word for word in words[1:] if not word.startswith("-") and "=" not in word):
            assert re.search(rf"^{re.escape(target)}:", makefile, re.M), f"the Makefile has no target {target!r}"
        return
    if words[0].startswith("python") and words[1:2] == ["-m"]:
        module = words[2]
        parse_script_arguments(lambda: runpy.run_module(module, run_name="__main__"), [module, *words[3:]])
        return
    script = next((i for i, word in enumerate(words) if word.endswith(".py")), None)
    if script is not None:
        path = ROOT / words[script]
        assert path.is_file(), f"{words[script]} does not exist"
        parse_script_arguments(lambda: runpy.run_path(str(path), run_name="__main__"),
                               [str(path), *words[script + 1:]])


@pytest.mark.parametrize("block", BASH_BLOCKS, ids=block_id)
def test_bash_block_commands_parse(block, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))  # scripts import their neighbours as the README runs them, from the root
    for line, words in command_lines(block):
        try:
            check_command(words)
        except SystemExit as exit:  # argparse's error exit; its message went to stderr
            if exit.code:
                fail_at(block, f"line {line}: `{shlex.join(words)}` is rejected by its parser (see stderr)")
        except Exception as error:
            fail_at(block, f"line {line}: `{shlex.join(words)}`: {type(error).__name__}: {error}")


def test_the_readme_test_sees_the_blocks():
    assert PYTHON_BLOCKS and BASH_BLOCKS
    assert all(block.code.strip() for block in BLOCKS)


def test_a_failing_block_names_its_line(placeholder_folders, tmp_path, monkeypatch):
    broken = Block("python", 42, "import torch\nmodel = undefined_name\n")
    with pytest.raises(pytest.fail.Exception, match=r"(?s)README.md line 42 .*NameError.*README.md\", line 43"):
        test_python_block_runs(broken, placeholder_folders, tmp_path, monkeypatch)
    rejected = Block("bash", 7, "scorekit sample x --scheduler NoSuchScheduler\n")
    with pytest.raises(pytest.fail.Exception, match=r"README.md line 7 .*line 7: `scorekit sample x"):
        test_bash_block_commands_parse(rejected, monkeypatch)
