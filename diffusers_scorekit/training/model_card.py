"""The model card written next to the saved pipeline, and the upload of the pipeline folder to the Hub."""

import os
from pathlib import Path
from typing import Dict

from ..metrics import NEIGHBOURHOOD_SIZE
from ..pipelines import ScoreSDEPipeline
from .checkpoints import CHECKPOINT_PREFIX, run_config
from .data import TrainingData

SAMPLE_IMAGE_NAME = "samples.png"
MODEL_CARD_TEMPLATE = Path(__file__).resolve().parents[2] / "model_cards" / "score_sde_model_card.md"


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
    repo_or_path = args.hub_model_id if args.push_to_hub else os.path.abspath(args.output_dir)
    output = "images" if data.is_image else "samples"
    batch_size = 16 if data.is_image else 2000
    call = f"{output} = pipe(batch_size={batch_size}, num_inference_steps={args.num_inference_steps}).{output}"
    if args.num_classes is not None:
        call = (f"labels = torch.arange({batch_size}) % {args.num_classes}  # label {args.num_classes} is the null "
                f"(unconditional) one\n{output} = pipe(batch_size={batch_size}, num_inference_steps="
                f"{args.num_inference_steps}, class_labels=labels, guidance_scale=2.0).{output}")
    training_config = {k: v for k, v in run_config(args, pipe.unet, data)["training"].items() if v is not None}
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


def push_to_hub(args) -> str:
    """Create the repo and upload the pipeline folder; on failure say so and where the files are."""
    from huggingface_hub import create_repo, upload_folder

    try:
        repo_id = create_repo(args.hub_model_id, exist_ok=True, private=args.hub_private_repo,
                              token=args.hub_token).repo_id
        upload_folder(repo_id=repo_id, folder_path=args.output_dir, token=args.hub_token,
                      commit_message="Upload score-based model trained with diffusers_scorekit",
                      ignore_patterns=[f"{CHECKPOINT_PREFIX}*", f".{CHECKPOINT_PREFIX}*", "samples/*",
                                       f"{args.logging_dir}/*"])
    except Exception as error:  # network, authentication and permission errors come in many types
        raise RuntimeError(
            f"pushing to the Hub repo {args.hub_model_id!r} failed ({type(error).__name__}: {error}). Nothing is "
            f"lost: the trained pipeline and its model card are in {os.path.abspath(args.output_dir)}; upload it "
            f"later with `huggingface-cli upload {args.hub_model_id} {args.output_dir}`."
        ) from error
    return repo_id
