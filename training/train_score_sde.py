"""Train a score-based generative model with accelerate; see ``diffusers_scorekit.training`` for the details.

    python training/train_score_sde.py --dataset two_moons --max_train_steps 3000 --output_dir moons
    torchrun --nproc_per_node 2 training/train_score_sde.py --dataset fashion_mnist --model ncsn --use_ema \\
        --output_dir fmnist                                     # two processes, on CPUs or GPUs
    accelerate launch --multi_gpu --num_processes 4 --num_machines 1 training/train_score_sde.py ...   # GPUs
    python training/train_score_sde.py --help
"""

from diffusers_scorekit.training import command_line

if __name__ == "__main__":
    command_line()
