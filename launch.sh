#!/usr/bin/env bash
# Start mmtrain on this node with `accelerate launch`, choosing the Accelerate config from the
# hardware: all local GPUs (multi_gpu.yaml), one GPU (single_gpu.yaml), or CPU processes (cpu.yaml).
#
#   ./launch.sh --config configs/default.yaml [--section.field VALUE ...]
#
# Environment:
#   NUM_PROCESSES       processes to start (default: number of GPUs, or 1 on a CPU-only machine)
#   ACCELERATE_CONFIG   an accelerate_configs/*.yaml to use instead of the automatic choice
#   MMTRAIN_DRY_RUN=1   print the command instead of running it
# Under SLURM: `srun ./launch.sh ... --train.resume auto` (see README, Checkpoints, resume and failures).
# Multi-node SLURM launching (one `accelerate launch` per node) is the cluster issue's work.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python}"

gpus="$("$python" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)"
if [[ -n "${ACCELERATE_CONFIG:-}" ]]; then
  config="$ACCELERATE_CONFIG"
  nproc="${NUM_PROCESSES:-$(( gpus > 0 ? gpus : 1 ))}"
elif (( gpus > 1 )); then
  config="$here/accelerate_configs/multi_gpu.yaml"; nproc="${NUM_PROCESSES:-$gpus}"
elif (( gpus == 1 )); then
  config="$here/accelerate_configs/single_gpu.yaml"; nproc=1
else
  config="$here/accelerate_configs/cpu.yaml"; nproc="${NUM_PROCESSES:-1}"
fi

if [[ "$config" == */cpu.yaml && "$nproc" == 1 ]]; then
  # cpu.yaml is a multi-worker rendezvous; one CPU process needs none.
  cmd=(accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no)
else
  cmd=(accelerate launch --config_file "$config" --num_processes "$nproc")
fi
cmd+=(-m mmtrain train "$@")

if [[ "${MMTRAIN_DRY_RUN:-0}" == 1 ]]; then
  printf '%q ' "${cmd[@]}"; echo
else
  # SLURM's pre-timeout signal (#SBATCH --signal=USR1@120) reaches every process of the job. The
  # launcher has no handler for it and would die, orphaning the workers; ignored here (inherited
  # across exec), it reaches only the workers, which save, requeue and exit 0 (mmtrain installs its
  # own handler). SIGTERM is the launcher's to forward: it passes it on to the workers.
  trap '' USR1
  exec "${cmd[@]}"
fi
