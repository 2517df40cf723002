#!/bin/bash
# Pretrain the three denoisers on a SLURM cluster: one task per node, `accelerate launch`
# starts one process per GPU on each node. Submit from the repository root:
#   sbatch pretrain/slurm_pretrain.sh                       # all three planes in turn
#   sbatch pretrain/slurm_pretrain.sh plane=sagittal        # extra key=value overrides
# Resubmitting the same job resumes from the latest checkpoint in pretrain.output_dir.
#SBATCH --job-name=orthodiff-pretrain
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=48:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --requeue
set -euo pipefail

CONFIG=${CONFIG:-reference}
GPUS_PER_NODE=${SLURM_GPUS_PER_NODE:-8}
MAIN_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MAIN_PORT=${MAIN_PORT:-29500}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
mkdir -p logs

# One launcher per node; SLURM_NODEID gives each its machine rank.
srun --kill-on-bad-exit=1 bash -c "accelerate launch \
    --config_file pretrain/accelerate/multi_node.yaml \
    --num_machines $SLURM_NNODES \
    --num_processes $((SLURM_NNODES * GPUS_PER_NODE)) \
    --machine_rank \$SLURM_NODEID \
    --main_process_ip $MAIN_ADDR \
    --main_process_port $MAIN_PORT \
    -m orthodiff pretrain -c $CONFIG $*"
