"""The model card written next to the saved pipeline, and the upload of the pipeline folder to the Hub."""

import os
from typing import Dict

from ..metrics import NEIGHBOURHOOD_SIZE
from ..model_card_template import MODEL_CARD_TEMPLATE
from ..pipelines import ScoreSDEPipeline
from .checkpoints import TrainingSetupError, checkpoints_dir, run_config
from .data import TrainingData

SAMPLE_IMAGE_NAME = "samples.png"
# what a push uploads from the pipeline folder: weights, configurations, the model card and the sample image
# (checkpoints are kept outside the folder; previews, logs and anything else stay local)
UPLOAD_ALLOW_PATTERNS = ["*.safetensors", "*.json", "README.md", SAMPLE_IMAGE_NAME]
UPLOAD_IGNORE_PATTERNS = ["samples/*", "logs/*", "checkpoint-*", ".*"]
NO_QUALITY_FIGURE = "none measured for this model"


def training_length(result: Dict[str, object]) -> str:
    """``TimeBudget.report``'s record as a line of the model card."""
    length = f"{result['steps']} of {result['max_train_steps']} steps, {result['training_minutes']} min"
    if result["time_budget_minutes"] is None:
        return length
    if result["stopped_by"] == "time_budget_minutes":
        return f"{length}: stopped by the {result['time_budget_minutes']:g}-min time budget"
    return f"{length} (time budget {result['time_budget_minutes']:g} min, not reached)"


def write_model_card(args, pipe: ScoreSDEPipeline, data: TrainingData, metrics: Dict[str, str],
                     steps: int) -> None:
    from huggingface_hub import ModelCard, ModelCardData

    if not MODEL_CARD_TEMPLATE.is_file():
        raise FileNotFoundError(f"model card template {MODEL_CARD_TEMPLATE} is missing.")
    tags = ["score-based", "sde", f"{args.sde}-sde", "diffusers", "diffusers_scorekit", args.model]
    if data.is_image:
        tags.append("unconditional-image-generation" if args.num_classes is None else "class-conditional")
    card_data = ModelCardData(
        library_name="diffusers_scorekit",
        license=args.license,
        tags=tags,
        datasets=[data.hub_dataset] if data.hub_dataset else None,
        pipeline_tag="unconditional-image-generation" if data.is_image else None,
    )
    scheduler = pipe.scheduler
    # the Hub id the folder is (or will be) uploaded to; without one, the folder's name, never a local path
    repo_or_path = args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))
    output = "images" if data.is_image else "samples"
    batch_size = 16 if data.is_image else 2000
    call = (f"{output} = pipe(batch_size={batch_size}, num_inference_steps={args.num_inference_steps}, "
            f"generator=generator).{output}")
    if args.num_classes is not None:
        call = (f"labels = torch.arange({batch_size}) % {args.num_classes}  # label {args.num_classes} is the null "
                f"(unconditional) one\n{output} = pipe(batch_size={batch_size}, num_inference_steps="
                f"{args.num_inference_steps}, generator=generator, class_labels=labels, guidance_scale=2.0)"
                f".{output}")
    if data.is_image and all(value.startswith("not measured") for name, value in metrics.items()
                             if name != "training length"):
        metrics = {**metrics, "sample quality": f"{NO_QUALITY_FIGURE} (bits/dim: train with "
                   "--eval_likelihood_samples N or run `scorekit likelihood`; Fashion-MNIST Fréchet distance: "
                   "benchmarks/eval_fashion_mnist.py)"}
    training_config = applicable_settings(args, pipe, data)
    card = ModelCard.from_template(
        card_data,
        template_path=str(MODEL_CARD_TEMPLATE),
        model_name=os.path.basename(os.path.abspath(args.output_dir)),
        model_class=type(pipe.unet).__name__,
        sde_description=repr(scheduler.sde),
        data_description=data.description,
        normalization=data.normalization,
        # labels only matter to a class-conditional model
        class_names=data.class_names if args.num_classes is not None else None,
        null_label=args.num_classes,
        training_config=training_config,
        model_config={k: v for k, v in dict(pipe.unet.config).items() if not k.startswith("_")},
        max_train_steps=steps,
        scheduler_class=type(scheduler).__name__,
        scheduler_config={k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")},
        num_inference_steps=args.num_inference_steps,
        nfe=len(scheduler.timesteps) if scheduler.timesteps is not None else "n/a",
        metrics=metrics,
        neighbourhood_size=None if data.is_image else NEIGHBOURHOOD_SIZE,
        sample_image=SAMPLE_IMAGE_NAME,
        repo_or_path=repo_or_path,
        usage_call=call,
    )
    card.save(os.path.join(args.output_dir, "README.md"))


def applicable_settings(args, pipe: ScoreSDEPipeline, data: TrainingData) -> Dict[str, object]:
    """The run's training settings that applied to it: unset ones, the other data sources', the other loss's,
    label dropout without labels, the EMA decay without EMA and the warm-up of a constant schedule are left out."""
    settings = run_config(args, pipe.unet, data)["training"]
    left_out = {"num_toy_samples"} if data.is_image else {"resolution", "center_crop", "random_flip"}
    if not args.dataset_name:
        left_out |= {"image_column", "dataset_config_name"}
    if args.num_classes is None:
        left_out.add("label_dropout")
    left_out |= {"time_sampling", "weighting", "importance_sampling"} if args.loss == "ssm" else {"num_projections"}
    if not args.use_ema:
        left_out.add("ema_decay")
    if args.lr_scheduler == "constant":
        left_out.add("lr_warmup_steps")
    if args.gradient_accumulation_steps == 1:
        left_out.add("gradient_accumulation_steps")
    return {k: v for k, v in settings.items() if v is not None and k not in left_out}


def upload_command(args) -> str:
    """The ``hf upload`` command that uploads what ``push_to_hub`` does (checkpoints are outside the folder)."""
    excludes = " ".join(f'--exclude "{pattern}"' for pattern in UPLOAD_IGNORE_PATTERNS)
    return f"hf upload {args.hub_model_id or 'your-name/model'} {args.output_dir} {excludes}"


def check_hub_access(args) -> None:
    """Before training: the token must be valid, allowed to write and the Hub reachable (``whoami``), so that a
    push does not fail only after hours of training. Offline (``HF_HUB_OFFLINE``) the check is skipped."""
    import logging

    from huggingface_hub import HfApi, constants

    logger = logging.getLogger(__name__)
    if constants.is_offline_mode():
        logger.warning("HF_HUB_OFFLINE is set: the Hub token and connection are not checked now, and the push after "
                       "training will fail unless the Hub is reachable by then; the pipeline stays in %s either way.",
                       os.path.abspath(args.output_dir))
        return
    try:
        identity = HfApi(token=args.hub_token).whoami()
    except Exception as error:  # no token, a bad one, or no network: many types
        raise TrainingSetupError(
            f"--push_to_hub: cannot reach the Hub as an authenticated user ({type(error).__name__}: {error}). Log in "
            "with `hf auth login` or pass --hub_token, check the connection, or train without --push_to_hub and "
            f"upload later with `{upload_command(args)}`.") from error
    role = identity.get("auth", {}).get("accessToken", {}).get("role")
    if role == "read":
        raise TrainingSetupError(f"--push_to_hub: the Hub token of {identity.get('name')!r} is read-only; use a "
                                 "token with write access (https://huggingface.co/settings/tokens).")


def push_to_hub(args) -> str:
    """Create the repo and upload the pipeline folder (``UPLOAD_ALLOW_PATTERNS``); on failure say so and where
    the files are."""
    from huggingface_hub import HfApi

    api = HfApi(token=args.hub_token)
    try:
        repo_id = api.create_repo(args.hub_model_id, exist_ok=True, private=args.hub_private_repo).repo_id
        api.upload_folder(repo_id=repo_id, folder_path=args.output_dir,
                          commit_message="Upload score-based model trained with diffusers_scorekit",
                          # copies: upload_folder appends its own patterns to the lists it gets
                          allow_patterns=list(UPLOAD_ALLOW_PATTERNS), ignore_patterns=list(UPLOAD_IGNORE_PATTERNS))
    except Exception as error:  # network, authentication and permission errors come in many types
        raise RuntimeError(
            f"pushing to the Hub repo {args.hub_model_id!r} failed ({type(error).__name__}: {error}). Nothing is "
            f"lost: the trained pipeline and its model card are in {os.path.abspath(args.output_dir)} (the "
            f"checkpoints in {checkpoints_dir(args.output_dir)}, which is never uploaded); upload it later with "
            f"`{upload_command(args)}`."
        ) from error
    return repo_id
