"""Train a score-based model with accelerate and save it as a ``ScoreSDEPipeline`` with a model card.

This is the logic behind ``training/train_score_sde.py`` and ``scorekit train`` (same arguments)::

    accelerate launch training/train_score_sde.py --dataset two_moons --model scorekit_mlp --sde ve \\
        --max_train_steps 3000 --output_dir outputs/moons-ve
    python training/train_score_sde.py --dataset fashion_mnist --model ncsn --resolution 28 --use_ema ...

It follows diffusers' ``train_unconditional.py`` (accelerate, EMA, warm-up, checkpoints, resuming) with one
difference in how data is fed: the order of the examples is a function of ``(seed, epoch)`` only, and every random
draw of an update (crops and flips, label dropout, the loss's times and noise) comes from a generator seeded with
``(seed, process, step or micro-batch)``. Image datasets are read through ``datasets`` (memory-mapped Arrow, or a
stream whose position each checkpoint saves as JSON) and decoded batch by batch in DataLoader workers. Nothing random is carried from one step to the
next, so a run killed at any point and resumed from its last checkpoint ends with exactly the weights of an
uninterrupted run: the checkpoint only has to hold the model, optimizer, learning-rate schedule and EMA.

Throughput: the speed switches (``--channels_last``, ``--allow_tf32``, ``--fused_optimizer``, ``--torch_compile``)
are each on, off, or left to ``--speed auto``, which turns on CUDA what helps there. The loop never waits for the
device between logging intervals: batches and the loss's random draws are made on the host and copied through
pinned memory without blocking, and the loss is summed on the device and read every ``--logging_steps``.
``benchmarks/bench_training_step.py`` measures each switch. ``--time_budget_minutes`` ends a run early by
wall-clock time, for comparisons at a fixed compute budget.

The package, one concern per module:

* ``arguments``: the command line (``build_parser``, ``parse_args``) and ``resolve_args``'s defaults and checks;
* ``data``: the loaders (2-D toys and Fashion-MNIST in memory; an image folder, a Hub dataset or a ``save_to_disk``
  folder through ``datasets``) into ``TrainingData``, and a run's micro-batches (``BatchOrder``,
  ``training_batches``) with the stream state its checkpoints save (``write_data_state``);
* ``models``: the network, the forward SDE and the sampling scheduler of a run (``build_model``, ``build_unet2d``);
* ``step``: one reproducible optimizer update (``step_generator``, ``prepare_training``,
  ``train_step``) and the speed switches (``resolve_speed``, ``build_optimizer``);
* ``checkpoints``: the run configuration, saving checkpoints as safetensors + JSON outside the pipeline folder,
  finding, verifying and loading the one to resume from, and the lock of a run's output folder;
* ``evaluation``: sampling the pipeline for previews and the model card's metrics;
* ``model_card``: the model card, the Hub access check before training and the push after it;
* ``loop``: ``main``, the training loop, and ``save_final``.

Every name is importable from ``diffusers_scorekit.training`` itself.
"""

from ..metrics import FASHION_MNIST_DIR, knn_coverage
from .arguments import (
    LICENSE_DEFAULT,
    LOSSES,
    MODELS,
    MULTI_PROCESS_HELP,
    SAMPLERS,
    SPEED_MODES,
    SPEED_SWITCHES,
    build_parser,
    check_ranges,
    check_resolution,
    check_writable,
    int_tuple,
    parse_args,
    resolve_args,
)
from .checkpoints import (
    CHECKPOINT_PREFIX,
    CHECKPOINTS_SUFFIX,
    RUN_CONFIG_NAME,
    TRAINING_STATE_NAME,
    CheckpointContents,
    CorruptCheckpointError,
    RunLock,
    TrainingSetupError,
    check_resumable,
    checkpoints_dir,
    find_resume_checkpoint,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    read_checkpoint,
    run_config,
    save_checkpoint,
)
from .data import (
    DATA_STATE_NAME,
    DATASETS,
    TOY_DATASETS,
    BatchOrder,
    ImageSource,
    TrainingData,
    load_data,
    load_fashion_mnist,
    load_image_source,
    load_toy,
    read_data_state,
    seed_of,
    toy_points,
    training_batches,
    transform_images,
    write_data_state,
)
from .evaluation import (
    TOY_PLOT_EXTENT,
    evaluation_labels,
    export_pipeline,
    image_grid,
    likelihood_metric,
    measure,
    sample_figure,
    sample_pipeline,
)
from .loop import KILL_AT_STEP_ENV, TimeBudget, command_line, ema_weights, main, save_final
from .model_card import (
    MODEL_CARD_TEMPLATE,
    NO_QUALITY_FIGURE,
    SAMPLE_IMAGE_NAME,
    UPLOAD_ALLOW_PATTERNS,
    UPLOAD_IGNORE_PATTERNS,
    applicable_settings,
    check_hub_access,
    push_to_hub,
    training_length,
    upload_command,
    write_model_card,
)
from .models import UNET2D_PRESETS, build_model, build_sampling_scheduler, build_unet2d, sde_config, training_sde
from .step import (
    TrainingState,
    build_optimizer,
    make_batch,
    prepare_training,
    resolve_speed,
    step_generator,
    to_device,
    train_step,
    training_loss,
)
