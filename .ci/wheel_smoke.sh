#!/usr/bin/env bash
# The user's path from a regular install: build the wheel, install it (with the `train` extra) into a fresh venv,
# then, outside the checkout and without PYTHONPATH, train a tiny two-moons model with `scorekit train`, sample it
# with `scorekit sample --calibrate`, check its model card, reload the pipeline with ScoreSDEPipeline.from_pretrained
# and sample it. Catches package data that only exists in the checkout (the model-card template, the Fashion-MNIST
# classifier).
#   PYTHON  the interpreter to build the venv from (default python3)
#   TORCH   the torch requirement(s) installed first (default: the Makefile's pair; pip's cache has them after `make`)
set -euo pipefail
cd "$(dirname "$0")/.."
checkout="$PWD"
PYTHON="${PYTHON:-python3}"
TORCH="${TORCH:-$(make -s --no-print-directory print-torch)}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
unset PYTHONPATH

pip_quiet=(--quiet --disable-pip-version-check)
# built from a copy of the tracked and unignored files: setuptools' build/ never lands in (or comes stale from) the checkout
mkdir "$work/src"
git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf - | tar -xf - -C "$work/src"
"$PYTHON" -m pip wheel "${pip_quiet[@]}" --no-deps --wheel-dir "$work/dist" "$work/src"
wheel="$(ls "$work"/dist/diffusers_scorekit-*.whl)"
# the wheel must carry its package data
members="$("$PYTHON" -m zipfile -l "$wheel")"
for member in diffusers_scorekit/assets/score_sde_model_card.md diffusers_scorekit/assets/fashion_mnist_classifier.safetensors \
              diffusers_scorekit/assets/fashion_mnist_classifier.json; do
    grep -q "^$member " <<<"$members" || { echo "wheel_smoke: $member is missing from $wheel"; exit 1; }
done

"$PYTHON" -m venv "$work/venv"
# shellcheck disable=SC2086  # TORCH is a list of requirements
"$work/venv/bin/pip" install "${pip_quiet[@]}" $TORCH
"$work/venv/bin/pip" install "${pip_quiet[@]}" "$wheel[train]"

mkdir "$work/run" && cd "$work/run"
"$work/venv/bin/scorekit" train --dataset two_moons --num_toy_samples 2000 --hidden_dim 32 --num_layers 2 \
    --train_batch_size 64 --max_train_steps 20 --checkpointing_steps 20 --num_inference_steps 5 \
    --num_eval_samples 64 --eval_likelihood_samples 0 --output_dir moons
# the fewest-NFE path: levels fitted to the model, then sampled on them
"$work/venv/bin/scorekit" sample moons --scheduler ProbabilityFlowODEScheduler --calibrate --num_inference_steps 4 \
    --num_samples 8 --output fitted.npy
"$work/venv/bin/python" - "$checkout" <<'PY'
import sys
from pathlib import Path

import numpy as np
import torch
from huggingface_hub import ModelCard

import diffusers_scorekit
from diffusers_scorekit import ScoreSDEPipeline
from diffusers_scorekit.metrics import load_fashion_mnist_classifier

checkout = Path(sys.argv[1]).resolve()
package = Path(diffusers_scorekit.__file__).resolve()
assert checkout not in package.parents, f"diffusers_scorekit was imported from the checkout ({package}), not the wheel"
card = ModelCard.load("moons/README.md")
assert card.data.library_name == "diffusers_scorekit" and "ScoreSDEPipeline.from_pretrained" in card.text, card.text[:500]
pipe = ScoreSDEPipeline.from_pretrained("moons")
samples = pipe(batch_size=8, num_inference_steps=5, generator=torch.manual_seed(0), output_type="pt").samples
assert samples.shape == (8, 2) and torch.isfinite(samples).all(), samples
fitted = np.load("fitted.npy")
assert fitted.shape == (8, 2) and np.isfinite(fitted).all(), fitted
classifier = load_fashion_mnist_classifier()
assert classifier(torch.zeros(1, 1, 28, 28)).shape == (1, 10)
print(f"wheel smoke test passed: {package.parent} trained, sampled on fitted levels, wrote its model card, reloaded and sampled")
PY
