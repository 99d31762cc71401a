"""Every GPU figure of issue #6 in one command sized to a short GPU slot (issue #15): at most 8 minutes of wall
time on one H100 / H200, one JSON and one Markdown table (and a Fashion-MNIST sample grid) in ``--output_dir``.

Parts, each run by the benchmark script named (imported, not copied), each in its own process under its own
time budget (``--budget PART=SECONDS``):

1. ``scheduler``: µs per scheduler step on a batch of 128 x 3 x 32 x 32 (the DDPM CIFAR-10 sample), every
   scorekit scheduler eager and captured in a CUDA graph, diffusers' DDPM, Euler, DPM-Solver multistep and
   ScoreSdeVe beside them (``bench_scheduler_overhead.py``).
2. ``pipeline``: pipeline wall time at NFE 50, bf16, batch 128, on the DDPM CIFAR-10 UNet2DModel (35.7 M), over
   NFE x the bare UNet forward (``bench_pipeline_overhead.py``).
3. ``training``: images/s of the DSM training step against train_unconditional's step, each speed switch alone
   and all together (``bench_training_step.py``).
4. ``likelihood``: wall time and bits/dim of the probability-flow likelihood against score_sde's scipy-RK45 path
   at the same tolerance (``bench_likelihood.py``'s cases on the GPU).
5. ``fashion_mnist``: the training script (``training.main``) and the DDPM-recipe baseline
   (``train_ddpm_baseline.py``) on the same 32-px UNet for an equal wall-clock budget, then Fréchet distance /
   precision / recall in the shipped classifier's features for every sampler at NFE 10, 20, 50 (DDPM's 1000 steps
   on a subset) and the test bits/dim (``eval_fashion_mnist.py``); its best sampler's grid is copied to
   ``--output_dir``.

Each part runs in a process forked from the suite (which has imported everything, so a part starts at once and
never touches the others' GPU state). A part stops starting new measurements once its budget is spent and is
killed a few seconds after it, keeping every row it finished (each row is written as it comes); a part that fails
or crashes keeps its rows and its error, and the parts after it run. The results are rewritten after every part.

``--smoke`` runs the same code on the CPU with tiny settings (about a minute on two cores; CUDA graphs and bf16
are left out there): ``tests/test_gpu_suite.py`` runs it. BENCHMARKS.md ("The GPU suite") gives the command for a
bare GPU machine.

    PYTHONPATH=. python benchmarks/gpu_suite.py --output_dir /tmp/gpu_suite [--fashion_mnist_dir DIR]
    PYTHONPATH=. python benchmarks/gpu_suite.py --smoke --output_dir /tmp/gpu_suite_smoke
"""

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

STARTED = time.monotonic()  # the suite's total budget counts its start-up (torch and diffusers imports) too

# the parts run in forked processes, which can use CUDA only if this one never initialised it: ask NVML (not the
# CUDA runtime) whether CUDA is there, as PyTorch recommends for forking programs
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")

BENCHMARKS = Path(__file__).resolve().parent
PARTS = ("scheduler", "pipeline", "training", "likelihood", "fashion_mnist")
# seconds per part on the GPU: 450 in all, which with the suite's start-up and GRACE_SECONDS for a part that has
# to be killed stays inside TOTAL_SECONDS, itself inside 8 minutes
GPU_BUDGETS = {"scheduler": 60, "pipeline": 25, "training": 95, "likelihood": 25, "fashion_mnist": 245}
SMOKE_BUDGETS = {"scheduler": 120, "pipeline": 120, "training": 180, "likelihood": 120, "fashion_mnist": 300}
TOTAL_SECONDS = {"gpu": 475, "smoke": 840}  # the smoke budgets only catch a hang on a loaded CPU
GRACE_SECONDS = 5  # after its budget, a part that has not stopped by itself is killed
RESULTS_JSON, RESULTS_MD, GRID_PNG = "gpu_suite.json", "gpu_suite.md", "fashion_mnist_grid.png"

# the reference figures and targets, printed above each table
TARGETS = {
    "scheduler": "target: <= 20 µs/step captured; diffusers on an H100 (issue): DDPM 552, Euler 131, "
                 "DPM-Solver 300, ScoreSdeVe PC 2,727 µs/step",
    "pipeline": "target: ratio to NFE x bare forward <= 1.03 (bf16, NFE 50)",
    "training": "target: all switches >= 1.2x the reference (train_unconditional's step; 1,472 img/s bf16 on an H100)",
    "likelihood": "target: >= 2x faster than score_sde's scipy RK45 at equal bits/dim (+-0.01)",
    "fashion_mnist": "equal wall-clock training budget; Fréchet distance / precision / recall in the shipped "
                     "classifier's features (not Inception FID)",
}


class PartRecord:
    """What one part has measured so far, rewritten to ``path`` at every change, so that a part stopped by its
    budget, killed or failing still leaves every row it finished."""

    def __init__(self, path: Path, budget_seconds: float):
        self.path, self.budget_seconds = path, budget_seconds
        self.start = time.monotonic()
        self.data = {"status": "running", "rows": [], "info": {}, "notes": []}
        self.flush()

    def seconds_left(self) -> float:
        return self.budget_seconds - (time.monotonic() - self.start)

    def out_of_time(self) -> bool:
        """True once the budget is spent; the part then starts nothing new (and is marked as cut short)."""
        if self.seconds_left() > 0:
            return False
        self.data["out_of_time"] = True
        return True

    def add(self, row: dict):
        """A new row, or one already added and since completed (the same dict)."""
        if not any(row is known for known in self.data["rows"]):
            self.data["rows"].append(row)
        self.flush()

    def set(self, **info):
        self.data["info"].update(info)
        self.flush()

    def note(self, text: str):
        self.data["notes"].append(text)
        self.flush()

    def flush(self):
        self.data["seconds"] = round(time.monotonic() - self.start, 2)
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(temporary, self.path)


# --- the parts (each runs in a process of its own, forked by run_child) ---------------------------------------


def device_and_dtype(smoke: bool):
    import torch

    if smoke:
        return torch.device("cpu"), torch.float32
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device: the GPU suite needs one (use --smoke for the CPU check).")
    return torch.device("cuda"), torch.bfloat16


def part_scheduler(args, record: PartRecord):
    import bench_scheduler_overhead as bench

    device, _ = device_and_dtype(args.smoke)
    # a captured loop of 10 levels compiles in a fifth of the time of 50, at the same cost per replayed step
    batch_size, steps, capture_steps = (8, 5, 5) if args.smoke else (128, 50, 10)
    record.set(batch_size=batch_size, steps=steps, captured_steps=capture_steps, dtype="float32", device=device.type)
    if device.type != "cuda":
        record.note("CUDA-graph capture is CUDA only: the captured column is left out")
    bench.measure(device, batch_size, steps, capture_steps=capture_steps, should_stop=record.out_of_time,
                  on_row=record.add)


def part_pipeline(args, record: PartRecord):
    import bench_pipeline_overhead as bench

    device, dtype = device_and_dtype(args.smoke)
    layout, batch_size, nfe, repeats = ("tiny", 2, 3, 1) if args.smoke else ("ddpm_cifar10", 128, 50, 3)
    record.set(layout=layout, batch_size=batch_size, nfe=nfe, dtype=str(dtype), repeats=repeats)
    unet, forward_seconds, _ = bench.measure(layout, batch_size, nfe, dtype, device, repeats=repeats,
                                             should_stop=record.out_of_time, on_row=record.add)
    record.set(forward_ms=forward_seconds * 1e3, parameters=sum(p.numel() for p in unet.parameters()))


def part_training(args, record: PartRecord):
    import bench_training_step as bench

    device, _ = device_and_dtype(args.smoke)
    argv = ["--small", "--batch_size", "4", "--warmup", "1", "--steps", "2"] if args.smoke else \
        ["--warmup", "5", "--steps", "25"]
    options = bench.parse_args(argv)
    mixed_precision = "no" if args.smoke else "bf16"
    record.set(batch_size=options.batch_size, block_out_channels=list(options.block_out_channels),
               warmup_steps=options.warmup, timed_steps=options.steps, mixed_precision=mixed_precision)
    # the headline configuration first and torch.compile alone last: each compile takes tens of seconds
    # the configurations with torch.compile last (each compiles for tens of seconds), after the reference's second
    # timing, so that a budget running out costs them and nothing else
    plan = bench.plan_of(["none", "channels_last", "allow_tf32", "fused_optimizer"])
    plan += [(bench.LABELS["all"], "all"), ("torch_compile", "torch_compile")]
    bench.measure(options, device, mixed_precision, plan, should_stop=record.out_of_time, on_row=record.add)


def part_likelihood(args, record: PartRecord):
    import bench_likelihood as bench

    device, _ = device_and_dtype(args.smoke)
    argv = ["--quick", "--rtol", "1e-3", "--atol", "1e-3"] if args.smoke else []
    options = bench.parse_args(argv)
    if args.smoke:
        options.oracle_samples = 64
    record.set(rtol=options.rtol, atol=options.atol, device=device.type)
    for case in (bench.oracle_case, bench.unet_case):
        if record.out_of_time():
            break
        result = case(options, device)
        ours, theirs = result["scorekit"], result["score_sde"]
        record.add({
            "model": result["model"], "exact_bits_per_dim": result["exact_bits_per_dim"],
            "scorekit_bits_per_dim": ours["bits_per_dim"], "score_sde_bits_per_dim": theirs["bits_per_dim"],
            "bits_per_dim_difference": ours["bits_per_dim"] - theirs["bits_per_dim"],
            "scorekit_nfe": ours["nfe"], "score_sde_nfe": theirs["nfe"],
            "scorekit_seconds": ours["seconds"], "score_sde_seconds": theirs["seconds"],
            "speed_up": theirs["seconds"] / ours["seconds"],
        })


def part_fashion_mnist(args, record: PartRecord):
    import eval_fashion_mnist
    import train_ddpm_baseline

    from diffusers_scorekit import training

    device, _ = device_and_dtype(args.smoke)
    work = Path(args.work_dir) / "fashion_mnist"
    # the two trainings get 35 % of the budget each; the evaluation gets the rest (~55 s on the GPU)
    train_minutes = 0.35 * record.seconds_left() / 60
    if args.smoke:
        network = ["--block_out_channels", "16,32,32,32", "--layers_per_block", "1"]
        run = ["--train_batch_size", "8", "--max_train_steps", "3", "--mixed_precision", "no"]
    else:
        network = []  # the training script's 32-px UNet2DModel preset (17.2 M parameters at one channel)
        run = ["--train_batch_size", "128", "--max_train_steps", str(args.fmnist_max_steps),
               "--mixed_precision", "bf16"]
    data = ["--fashion_mnist_dir", args.fashion_mnist_dir]
    budget = ["--time_budget_minutes", f"{train_minutes:.4f}"]
    record.set(device=device.type, train_minutes_each=train_minutes, recipe_arguments=run + network)

    ours_dir = str(work / "scorekit")
    # torch.compile off: its compilation would take a large part of a 2-minute budget
    training.main(training.parse_args([
        "--dataset", "fashion_mnist", "--resolution", "32", "--model", "unet2d", "--sde", "vp", "--use_ema",
        "--random_flip", "--report_to", "none", "--no-torch_compile", "--checkpointing_steps", "1000000",
        "--sampler", "ode", "--num_inference_steps", "10", "--num_eval_samples", "4" if args.smoke else "16",
        "--output_dir", ours_dir, *data, *budget, *run, *network]))
    config = json.loads(Path(ours_dir, training.RUN_CONFIG_NAME).read_text())
    record.set(scorekit_training=config["result"])

    ddpm_dir = str(work / "ddpm")
    warmup = ["--lr_warmup_steps", "1"] if args.smoke else []
    train_ddpm_baseline.main(train_ddpm_baseline.parse_args(
        ["--output_dir", ddpm_dir, *data, *budget, *run, *network, *warmup]))
    baseline = json.loads(Path(ddpm_dir, train_ddpm_baseline.RUN_RECORD_NAME).read_text())
    record.set(ddpm_training=baseline["result"])

    if args.smoke:
        sampling = ["--nfe", "2", "--num_samples", "16", "--batch_size", "16", "--ddpm_reference_steps", "4",
                    "--ddpm_reference_samples", "8", "--adaptive_tolerance", "0.1", "--bpd_examples", "1",
                    "--bpd_tolerance", "1e-2"]
    else:
        sampling = ["--nfe", "10", "20", "50", "--num_samples", str(args.fmnist_samples), "--batch_size", "1000",
                    "--ddpm_reference_steps", "1000", "--ddpm_reference_samples", str(args.fmnist_samples // 5),
                    "--adaptive_tolerance", "1e-3", "--bpd_examples", "100"]
    # what is left, less a few seconds to write the grid and the results
    eval_seconds = max(1.0, record.seconds_left() - 5)
    results = eval_fashion_mnist.main([
        "--scorekit_pipeline", ours_dir, "--ddpm_pipeline", ddpm_dir, "--device", device.type, *data, *sampling,
        "--time_budget_seconds", f"{eval_seconds:.1f}", "--output_dir", str(work / "eval")], on_row=record.add)
    record.set(test_bits_per_dim=results["bits_per_dim"], bpd_examples=results["bpd_examples"],
               left_out_by_time_budget=results["left_out_by_time_budget"])
    if results["left_out_by_time_budget"]:
        record.data["out_of_time"] = True
    if results["grid"]:
        shutil.copy(results["grid"], Path(args.output_dir) / GRID_PNG)
        record.set(grid=GRID_PNG, grid_sampler=f"{results['best_at_nfe_50']['sampler']} "
                                               f"(NFE {results['best_at_nfe_50']['nfe']:.0f})")


PART_FUNCTIONS = {"scheduler": part_scheduler, "pipeline": part_pipeline, "training": part_training,
                  "likelihood": part_likelihood, "fashion_mnist": part_fashion_mnist}


def run_part(part: str, budget: float, args, path: Path) -> int:
    """What the forked process of one part runs: the part, then how it ended, in ``path``."""
    record = PartRecord(path, budget)
    try:
        record.data["machine"] = machine(args.smoke)
        PART_FUNCTIONS[part](args, record)
        record.data["status"] = "out of time" if record.data.get("out_of_time") else "complete"
        return_code = 0
    except Exception as error:  # noqa: BLE001 -- recorded: the suite goes on with the next part
        record.data["status"] = "failed"
        record.data["error"] = f"{type(error).__name__}: {error}"
        record.data["traceback"] = traceback.format_exc()
        traceback.print_exc()
        return_code = 1
    record.flush()
    return return_code


# --- the suite: one process per part, the results after each -----------------------------------------------------


def run_suite(args) -> dict:
    mode = "smoke" if args.smoke else "gpu"
    budgets = {**(SMOKE_BUDGETS if args.smoke else GPU_BUDGETS), **args.budget}
    total = args.total_seconds or TOTAL_SECONDS[mode]
    start = STARTED
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="gpu_suite_"))
    work.mkdir(parents=True, exist_ok=True)
    results = {"mode": mode, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(sys.argv),
               "total_budget_seconds": total, "machine": None, "parts": {}}
    for part in args.parts:
        left = total - (time.monotonic() - start) - GRACE_SECONDS
        budget = min(budgets[part], left)
        if budget <= 0:
            results["parts"][part] = {"status": "not run: the suite's total time was spent", "rows": [],
                                      "budget_seconds": budgets[part]}
            continue
        results["parts"][part] = run_child(part, budget, args, work)
        results["machine"] = results["machine"] or results["parts"][part].get("machine")
        results["seconds"] = round(time.monotonic() - start, 1)
        write_results(results, output)
        print(f"[gpu_suite] {part}: {results['parts'][part]['status']} after "
              f"{results['parts'][part].get('seconds', '?')} s of {budget:.0f}", flush=True)
    results["seconds"] = round(time.monotonic() - start, 1)
    write_results(results, output)
    print((output / RESULTS_MD).read_text())
    return results


def run_child(part: str, budget: float, args, work: Path) -> dict:
    """Runs one part in a forked process (its own process group, so that a compiler's workers go with it) and
    kills the group ``GRACE_SECONDS`` after ``budget``; returns the part's record."""
    path = work / f"{part}.json"
    path.unlink(missing_ok=True)
    import torch

    if torch.cuda.is_initialized():
        raise RuntimeError("the suite's process initialised CUDA: its forked parts could not use it.")
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the part's process
        os.setsid()
        code = 1
        try:
            code = run_part(part, budget, args, path)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    deadline = time.monotonic() + budget + GRACE_SECONDS
    status = None
    while status is None and time.monotonic() < deadline:
        finished, status = os.waitpid(pid, os.WNOHANG)
        status = status if finished else None
        time.sleep(0.05)
    killed = status is None
    if killed:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:  # not yet the leader of its own group
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
    record = json.loads(path.read_text()) if path.is_file() else {"rows": [], "info": {}, "notes": []}
    record["budget_seconds"] = round(budget, 1)
    if killed:
        record["status"] = "out of time (killed)"
        record["out_of_time"] = True
    elif os.waitstatus_to_exitcode(status) != 0 and record.get("status") != "failed":
        record["status"] = "failed"
        record["error"] = f"the part's process ended with exit status {os.waitstatus_to_exitcode(status)}"
    return record


def machine(smoke: bool) -> dict:
    """Where the parts run (asked in a part's process: the suite's own process never initialises CUDA, which a
    forked process could not use then)."""
    import torch

    from common import device_name

    device = torch.device("cpu" if smoke or not torch.cuda.is_available() else "cuda")
    versions = {"python": sys.version.split()[0], "torch": torch.__version__}
    for package in ("diffusers", "accelerate"):
        try:
            versions[package] = __import__(package).__version__
        except ImportError:
            versions[package] = None
    return {"device": device_name(device), **versions}


# --- the JSON and the Markdown -----------------------------------------------------------------------------------

# per part: (column title, row key, format)
COLUMNS = {
    "scheduler": [("scheduler", "scheduler", "{}"), ("µs / step", "us_per_step", "{:.1f}"),
                  ("ratio to diffusers Euler", "ratio_to_diffusers_euler", "{:.2f}"),
                  ("captured µs / step", "captured_us_per_step", "{:.1f}"),
                  ("captured = eager output", "captured_same_output", "{}")],
    "pipeline": [("sampler", "sampler", "{}"), ("NFE", "nfe", "{}"), ("seconds", "seconds", "{:.4f}"),
                 ("ratio to NFE x forward", "ratio_to_nfe_forwards", "{:.3f}")],
    "training": [("step", "step", "{}"), ("speed switches", "config", "{}"),
                 ("img/s", "images_per_second", "{:.1f}"), ("ratio to reference", "ratio_to_reference", "{:.2f}"),
                 ("ms / step", "ms_per_step", "{:.1f}"), ("warm-up s", "warmup_seconds", "{:.1f}"),
                 ("note", "note", "{}")],
    "likelihood": [("model", "model", "{}"), ("exact bits/dim", "exact_bits_per_dim", "{:.4f}"),
                   ("scorekit bits/dim", "scorekit_bits_per_dim", "{:.4f}"),
                   ("score_sde bits/dim", "score_sde_bits_per_dim", "{:.4f}"),
                   ("difference", "bits_per_dim_difference", "{:+.4f}"), ("scorekit NFE", "scorekit_nfe", "{}"),
                   ("score_sde NFE", "score_sde_nfe", "{}"), ("scorekit s", "scorekit_seconds", "{:.2f}"),
                   ("score_sde s", "score_sde_seconds", "{:.2f}"), ("speed-up", "speed_up", "{:.2f}x")],
    "fashion_mnist": [("model", "model", "{}"), ("sampler", "sampler", "{}"), ("NFE", "nfe", "{:.0f}"),
                      ("images", "num_generated", "{}"), ("Fréchet distance", "frechet_distance", "{:.3f}"),
                      ("precision", "precision", "{:.3f}"), ("recall", "recall", "{:.3f}"),
                      ("seconds", "seconds", "{:.1f}")],
}
TITLES = {"scheduler": "1. Scheduler cost per step", "pipeline": "2. Pipeline wall time against NFE x bare forward",
          "training": "3. Training images/s", "likelihood": "4. Likelihood against score_sde's scipy RK45",
          "fashion_mnist": "5. Fashion-MNIST, equal training budget"}


def fill_training_ratios(part: dict):
    """Ratios to the mean reference for training rows that lack them (a part killed before it computed them)."""
    references = [row["images_per_second"] for row in part["rows"]
                  if row.get("step") == "reference" and "images_per_second" in row]
    for row in part["rows"]:
        if references and "images_per_second" in row and "ratio_to_reference" not in row:
            row["ratio_to_reference"] = row["images_per_second"] / (sum(references) / len(references))


def cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None:
        return "skipped" if row.get("skipped") and key == "images_per_second" else "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    return fmt.format(value)


def markdown(results: dict) -> str:
    machine = results["machine"] or {}
    lines = [f"# GPU suite ({results['mode']}): {machine.get('device')}", "",
             f"{results['started']}, torch {machine.get('torch')}, diffusers {machine.get('diffusers')}, "
             f"accelerate {machine.get('accelerate')}; {results.get('seconds', '?')} s of "
             f"{results['total_budget_seconds']} s. `{results['command']}`", ""]
    for name, part in results["parts"].items():
        lines += [f"## {TITLES[name]}: {part['status']} ({part.get('seconds', '-')} s of "
                  f"{part.get('budget_seconds', '-')} s)", "", TARGETS[name] + ".", ""]
        if part.get("info"):
            lines += ["Settings and totals: " + ", ".join(f"{key} {json.dumps(value, default=str)}"
                                                         for key, value in part["info"].items()), ""]
        lines += [f"Note: {note}" for note in part.get("notes", [])]
        if part.get("error"):
            lines += [f"Error: `{part['error']}`", ""]
        columns = COLUMNS[name]
        lines += ["| " + " | ".join(title for title, _, _ in columns) + " |",
                  "| " + " | ".join("---" for _ in columns) + " |"]
        lines += ["| " + " | ".join(cell(row, key, fmt) for _, key, fmt in columns) + " |" for row in part["rows"]]
        lines.append("")
    return "\n".join(lines)


def write_results(results: dict, output: Path):
    if "training" in results["parts"]:
        fill_training_ratios(results["parts"]["training"])
    (output / RESULTS_JSON).write_text(json.dumps(results, indent=1, default=str))
    (output / RESULTS_MD).write_text(markdown(results))


def budget_item(text: str):
    name, _, seconds = text.partition("=")
    if name not in PARTS or not seconds:
        raise argparse.ArgumentTypeError(f"--budget takes PART=SECONDS with PART among {PARTS}, got {text!r}")
    return name, float(seconds)


def parse_args(argv=None):
    from diffusers_scorekit.metrics import FASHION_MNIST_DIR

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True, help=f"gets {RESULTS_JSON}, {RESULTS_MD} and {GRID_PNG}")
    parser.add_argument("--smoke", action="store_true", help="the same code on the CPU with tiny settings")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--budget", type=budget_item, action="append", default=[],
                        help=f"PART=SECONDS, repeatable (defaults: GPU {GPU_BUDGETS}, smoke {SMOKE_BUDGETS})")
    parser.add_argument("--total_seconds", type=float, default=None,
                        help=f"for the whole suite, start-up included (default: GPU {TOTAL_SECONDS['gpu']}, "
                             f"smoke {TOTAL_SECONDS['smoke']})")
    parser.add_argument("--fashion_mnist_dir", default=FASHION_MNIST_DIR, help="folder of the four .gz files")
    parser.add_argument("--fmnist_max_steps", type=int, default=3000,
                        help="max_train_steps of both Fashion-MNIST runs (their learning-rate schedules span it); "
                             "the time budget stops them first")
    parser.add_argument("--fmnist_samples", type=int, default=1000, help="generated images per sampler and NFE")
    parser.add_argument("--work_dir", default=None, help="models and per-part records (default: a temporary folder)")
    args = parser.parse_args(argv)
    args.budget = dict(args.budget)
    for name, seconds in args.budget.items():
        if not seconds > 0:
            parser.error(f"--budget {name}={seconds:g}: the seconds must be > 0.")
    return args


def main(argv=None):
    sys.path.insert(0, str(BENCHMARKS))
    args = parse_args(argv)
    # everything the parts import, imported once here: each forked part starts with it
    import bench_likelihood  # noqa: F401
    import bench_pipeline_overhead  # noqa: F401
    import bench_scheduler_overhead  # noqa: F401
    import bench_training_step  # noqa: F401
    import eval_fashion_mnist  # noqa: F401
    run_suite(args)


if __name__ == "__main__":
    main()
