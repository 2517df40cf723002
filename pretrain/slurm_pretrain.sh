#!/bin/bash
# Pretrain the three denoisers on a SLURM cluster: one task per node, `accelerate launch`
# starts one process per GPU on each node. Submit from the repository root:
#   sbatch pretrain/slurm_pretrain.sh                       # all three planes in turn
#   sbatch pretrain/slurm_pretrain.sh plane=sagittal        # extra key=value overrides
#   sbatch pretrain/slurm_pretrain.sh "tracking.run_name=knee run 2"   # quoted overrides stay whole
# Resubmitting the same job resumes from the latest checkpoint in pretrain.output_dir; resume on the
# same number of nodes x GPUs (a checkpoint of another process count is refused).
# The job's output goes to <job name>-<job id>.out in the submit directory (SLURM opens it before
# the script runs, so it cannot be in a folder the script would create).
#SBATCH --job-name=orthodiff-pretrain
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=48:00:00
#SBATCH --output=%x-%j.out
#SBATCH --requeue
set -euo pipefail

CONFIG=${CONFIG:-reference}
GPUS_PER_NODE=${SLURM_GPUS_PER_NODE:-8}
# sed reads the whole list: `head` would close the pipe early, and under pipefail the SIGPIPE that
# scontrol then gets would end the job
MAIN_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)
MAIN_PORT=${MAIN_PORT:-29500}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
# SLURM 22.05 and later no longer hand --cpus-per-task from sbatch to srun
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK; fi
export CONFIG GPUS_PER_NODE MAIN_ADDR MAIN_PORT

# One launcher per node; SLURM_NODEID gives each its machine rank. The overrides travel as
# arguments of the inner shell ("$@"), so spaces and quotes in them survive.
srun --kill-on-bad-exit=1 bash -c 'accelerate launch \
    --config_file pretrain/accelerate/multi_node.yaml \
    --num_machines "$SLURM_NNODES" \
    --num_processes "$((SLURM_NNODES * GPUS_PER_NODE))" \
    --machine_rank "$SLURM_NODEID" \
    --main_process_ip "$MAIN_ADDR" \
    --main_process_port "$MAIN_PORT" \
    -m orthodiff pretrain -c "$CONFIG" "$@"' orthodiff-pretrain "$@"
