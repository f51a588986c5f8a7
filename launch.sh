#!/usr/bin/env bash
#SBATCH --job-name=mmtrain
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --signal=USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
#
# Start mmtrain with one `accelerate launch` per node: on this machine, on several machines by
# hand, or on a SLURM allocation. (The #SBATCH lines above are defaults: sbatch's own options
# override them, e.g. `sbatch --nodes 4 --gpus-per-node 4 launch.sh ...`. --open-mode=append keeps
# the log of the attempts before a requeue; Slurm opens logs/ (in the submit folder) before this
# script runs, so create it once: `mkdir -p logs`.)
#
#   ./launch.sh [launch options] [-- mmtrain train options]
#   ./launch.sh -- --config configs/default.yaml --train.output_dir runs/big
#   mkdir -p logs && sbatch launch.sh -- --config configs/default.yaml --train.output_dir runs/big --train.resume auto
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 ./launch.sh -- --config configs/default.yaml   # node 0
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 ./launch.sh -- --config configs/default.yaml   # node 1
#
# Launch options (each also --option=VALUE):
#   --nnodes N           machines (env NNODES; default 1)
#   --node-rank R        this machine's rank, 0..N-1 (env NODE_RANK; default 0)
#   --master-addr HOST   address of the machine of rank 0 (env MASTER_ADDR; needed when N > 1)
#   --master-port PORT   its rendezvous port (env MASTER_PORT; default 29500, under SLURM
#                        15000 + job id % 15000 so that two jobs sharing a node do not collide;
#                        below Linux's ephemeral ports, 32768-60999, which other sockets take)
#   --nproc-per-node P   processes per machine (env NUM_PROCESSES; default: the GPUs of the
#                        machine, or 1 CPU process)
#   --dry-run            print the command each machine would run instead of running it
#                        (env MMTRAIN_DRY_RUN=1); under sbatch: one line per node
#   -h, --help           this text
# Without `--`, arguments that are not launch options go to mmtrain as they are (older form).
#
# Environment:
#   GPUS_PER_NODE       GPUs per machine, instead of SLURM's count or the detected one
#   ACCELERATE_CONFIG   an accelerate_configs/*.yaml to use instead of the automatic choice
#                       (cpu.yaml, single_gpu.yaml, multi_gpu.yaml, multi_node.yaml; fsdp.yaml)
#   PYTHON              the Python that detects GPUs (default: python)
#
# Under SLURM the allocation decides: the machines are SLURM's nodes, the rank is each node's own
# SLURM_NODEID, the head is the first host of the nodelist; NNODES, NODE_RANK, MASTER_ADDR and
# MASTER_PORT from the environment are ignored there (a value exported into the job is the same on
# every node). Run as the batch script (sbatch), launch.sh starts itself once per node with srun
# and waits; run inside a step (srun launch.sh, SLURM_STEP_ID set), it is that node's task.
set -euo pipefail

die() { echo "launch.sh: $*" >&2; exit 2; }
is_uint() { [[ $1 =~ ^(0|[1-9][0-9]*)$ ]]; }  # no leading zeros: bash would read 08 as octal
in_range() { is_uint "$1" && (($1 >= $2 && $1 <= $3)); }  # value min max

usage() {
  # The comment block above, from after the #SBATCH lines to the first command.
  awk 'NR > 1 && !/^#/ { exit } NR > 1 && !/^#SBATCH/ && (text || !/^#$/) { text = 1; sub(/^# ?/, ""); print }' \
    "${BASH_SOURCE[0]}"
}

# ---- arguments -----------------------------------------------------------------------------
dry_run="${MMTRAIN_DRY_RUN:-0}"
opt_nnodes="" opt_rank="" opt_addr="" opt_port="" opt_nproc=""
launch_opts=()  # passed on unchanged to each node's task under sbatch
train_args=()
while (($#)); do
  case "$1" in
    --nnodes=* | --node-rank=* | --master-addr=* | --master-port=* | --nproc-per-node=*)
      set -- "${1%%=*}" "${1#*=}" "${@:2}"
      continue ;;
    --nnodes | --node-rank | --master-addr | --master-port | --nproc-per-node)
      (($# >= 2)) || die "$1 needs a value, e.g. $1 2"
      case "$1" in
        --nnodes) opt_nnodes="$2" ;;
        --node-rank) opt_rank="$2" ;;
        --master-addr) opt_addr="$2" ;;
        --master-port) opt_port="$2" ;;
        --nproc-per-node) opt_nproc="$2" ;;
      esac
      launch_opts+=("$1" "$2")
      shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; train_args=("$@"); break ;;
    *) train_args=("$@"); break ;;  # the older form: everything is mmtrain's
  esac
done

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [[ ! -d "$here/accelerate_configs" && -f "${SLURM_SUBMIT_DIR:-}/launch.sh" ]]; then
  # sbatch runs a copy of the script from its spool folder (on the first node only): the repository
  # is where the job was submitted from.
  here="$SLURM_SUBMIT_DIR"
fi
[[ -d "$here/accelerate_configs" ]] || die "accelerate_configs/ not found next to launch.sh ($here); \
run launch.sh from the repository (under SLURM: submit it from the repository root)"
python="${PYTHON:-python}"

# ---- where we are: outside SLURM, SLURM's batch script, or one node's task of a step -----------
slurm_mode=none
if [[ -n "${SLURM_JOB_ID:-}" ]]; then
  # The batch step has no SLURM_STEP_ID (some versions show the batch step's number, 4294967294, or
  # "batch"); srun sets it in every task, and MMTRAIN_LAUNCH_TASK marks the tasks this script starts.
  case "${SLURM_STEP_ID:-}" in
    "" | batch | 4294967294) slurm_mode="batch" ;;
    *) slurm_mode="task" ;;
  esac
  [[ "${MMTRAIN_LAUNCH_TASK:-0}" == 1 ]] && slurm_mode=task
fi

if [[ $slurm_mode == none ]]; then
  nnodes="${opt_nnodes:-${NNODES:-1}}"
  rank="${opt_rank:-${NODE_RANK:-0}}"
  addr="${opt_addr:-${MASTER_ADDR:-}}"
  port="${opt_port:-${MASTER_PORT:-}}"
  in_range "$nnodes" 1 100000 || die "NNODES (--nnodes) must be a whole number >= 1, got '$nnodes'"
  in_range "$rank" 0 $((nnodes - 1)) || die "NODE_RANK (--node-rank) must be a whole number from 0 to \
$((nnodes - 1)) (NNODES=$nnodes), got '$rank'"
  if ((nnodes > 1)); then
    [[ -n "$addr" ]] || die "NNODES=$nnodes needs MASTER_ADDR (or --master-addr): the address of the \
machine with NODE_RANK 0, the same on every machine"
    port="${port:-29500}"
  fi
  hosts=()
else
  [[ -z "$opt_nnodes$opt_rank" ]] || die "under SLURM the node count and this node's rank come from \
the allocation (SLURM_NNODES, SLURM_NODEID): drop --nnodes/--node-rank"
  # A step may span fewer nodes than the job (srun -N 2 inside a 4-node allocation): its own counts.
  nnodes="${SLURM_STEP_NUM_NODES:-${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}}"
  nodelist="${SLURM_STEP_NODELIST:-${SLURM_JOB_NODELIST:-${SLURM_NODELIST:-}}}"
  [[ $slurm_mode == batch ]] && nnodes="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}" \
    && nodelist="${SLURM_JOB_NODELIST:-${SLURM_NODELIST:-}}"
  in_range "$nnodes" 1 100000 || die "SLURM_NNODES must be a whole number >= 1, got '$nnodes'"
  if [[ $slurm_mode == task ]]; then
    tasks="${SLURM_STEP_NUM_TASKS:-$nnodes}"
    [[ "$tasks" == "$nnodes" ]] || die "this step runs $tasks tasks on $nnodes nodes; launch.sh must \
be one task per node (accelerate launch starts the processes of a node): srun --ntasks-per-node=1"
    # Evaluated here, on the node, by the node's own task: a $SLURM_NODEID expanded by the batch
    # script would be the batch node's 0 on every node (accelerate #2816).
    rank="${SLURM_NODEID:-0}"
    in_range "$rank" 0 $((nnodes - 1)) || die "SLURM_NODEID must be 0..$((nnodes - 1)), got '$rank'"
  fi
  hosts=()
  if ((nnodes > 1)) || [[ $slurm_mode == batch ]]; then
    [[ -n "$nodelist" ]] || die "SLURM_JOB_NODELIST is not set: cannot find the head node"
    command -v scontrol >/dev/null || die "scontrol not found: it expands SLURM_JOB_NODELIST into host names"
    mapfile -t hosts < <(scontrol show hostnames "$nodelist")
    ((${#hosts[@]} == nnodes)) || die "scontrol show hostnames '$nodelist' gave ${#hosts[@]} hosts for \
$nnodes nodes"
  fi
  addr="${opt_addr:-${hosts[0]:-}}"
  is_uint "$SLURM_JOB_ID" || die "SLURM_JOB_ID must be a job number, got '$SLURM_JOB_ID'"
  port="${opt_port:-$((15000 + SLURM_JOB_ID % 15000))}"
  if ((nnodes == 1)) && [[ -z "$opt_port" ]]; then
    port=""  # one node: as outside SLURM, accelerate's default port (it falls back to a free one)
  fi
fi
if [[ -n "$port" ]]; then
  in_range "$port" 1 65535 || die "MASTER_PORT (--master-port) must be a TCP \
port 1..65535, got '$port'"
fi

# ---- processes per node and the accelerate config ----------------------------------------------
slurm_gpus() {
  # SLURM_GPUS_ON_NODE is a count; SLURM_GPUS_PER_NODE is as requested: 4, gpu:4, a100:4, a100:2,v100:2.
  if [[ -n "${SLURM_GPUS_ON_NODE:-}" ]]; then
    echo "$SLURM_GPUS_ON_NODE"
  elif [[ -n "${SLURM_GPUS_PER_NODE:-}" ]]; then
    local total=0 part count
    local -a parts
    IFS=, read -ra parts <<<"$SLURM_GPUS_PER_NODE"
    for part in "${parts[@]}"; do
      count="${part##*:}"
      count="${count%%(*}"
      is_uint "$count" || die "cannot read a GPU count from SLURM_GPUS_PER_NODE='$SLURM_GPUS_PER_NODE'; \
set GPUS_PER_NODE"
      total=$((total + count))
    done
    echo "$total"
  fi
}
detect_gpus() {
  # torch sees what CUDA_VISIBLE_DEVICES leaves; nvidia-smi is the fallback when torch cannot load.
  local n
  if n="$("$python" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null)" && is_uint "$n"; then
    echo "$n"
  elif command -v nvidia-smi >/dev/null && n="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ')"; then
    echo "$n"
  else
    echo 0
  fi
}
gpus="${GPUS_PER_NODE:-}"
if [[ -z "$gpus" && $slurm_mode != none ]]; then gpus="$(slurm_gpus)"; fi
if [[ -z "$gpus" ]]; then gpus="$(detect_gpus)"; fi
is_uint "$gpus" || die "the GPUs per node (GPUS_PER_NODE, else SLURM_GPUS_ON_NODE) must be a whole number, \
got '$gpus'"

nproc="${opt_nproc:-${NUM_PROCESSES:-$((gpus > 0 ? gpus : 1))}}"
in_range "$nproc" 1 100000 || die "NUM_PROCESSES (--nproc-per-node) must be a whole number >= 1, \
got '$nproc'"
if [[ -n "${ACCELERATE_CONFIG:-}" ]]; then
  config="$ACCELERATE_CONFIG"
  [[ -f "$config" ]] || die "ACCELERATE_CONFIG=$config: no such file (see accelerate_configs/)"
elif ((nnodes > 1)); then
  # CPU machines use cpu.yaml's launcher mode (MULTI_GPU, N workers with a rendezvous): mmtrain
  # builds its Accelerator with cpu=True without CUDA, so the workers of all nodes form one gloo group.
  config="$here/accelerate_configs/cpu.yaml"
  if ((gpus > 0)); then config="$here/accelerate_configs/multi_node.yaml"; fi
elif ((gpus > 1)); then
  config="$here/accelerate_configs/multi_gpu.yaml"
elif ((gpus == 1)) && [[ -z "$opt_nproc" && -z "${NUM_PROCESSES:-}" ]]; then
  config="$here/accelerate_configs/single_gpu.yaml"; nproc=1
elif ((gpus == 1)); then
  # Several processes asked for on one GPU (they share it): the multi-process launcher mode.
  config="$here/accelerate_configs/multi_gpu.yaml"
else
  config="$here/accelerate_configs/cpu.yaml"
fi

# The command of the machine with rank $1, in the array `cmd`.
build_command() {
  local machine_rank="$1"
  if ((nnodes == 1)); then
    if [[ "$config" == */cpu.yaml && "$nproc" == 1 ]]; then
      # cpu.yaml is a multi-worker rendezvous; one CPU process needs none.
      cmd=(accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no)
    else
      cmd=(accelerate launch --config_file "$config" --num_processes "$nproc")
    fi
    if [[ -n "$port" ]]; then cmd+=(--main_process_port "$port"); fi
  else
    # The c10d rendezvous: the head's launcher hosts the store at addr:port and the others connect
    # to it (waiting up to c10d's read_timeout, 60 s, if they start first). is_host is explicit: on
    # one host (loopback) every launcher would think it is the head, and the loser of the race
    # for the port would fail accelerate's port check on the head. Not --same_network: in
    # accelerate it sets the static rendezvous's MASTER_ADDR/PORT and leaves c10d without its endpoint.
    local is_host=false
    ((machine_rank == 0)) && is_host=true
    cmd=(accelerate launch --config_file "$config" --num_processes "$((nnodes * nproc))"
      --num_machines "$nnodes" --machine_rank "$machine_rank" --main_process_ip "$addr"
      --main_process_port "$port" --rdzv_backend c10d --rdzv_conf "is_host=$is_host")
  fi
  cmd+=(-m mmtrain train "${train_args[@]}")
}
print_command() {  # [host prefix]
  if (($#)); then printf '%s: ' "$1"; fi
  printf '%q ' "${cmd[@]}"
  echo
}

# ---- SLURM's batch script: one task per node, signals forwarded, the step's exit code ----------
if [[ $slurm_mode == batch ]]; then
  srun_cmd=(srun --nodes="$nnodes" --ntasks="$nnodes" --ntasks-per-node=1 --kill-on-bad-exit=1)
  # srun no longer inherits the batch's --cpus-per-task (Slurm 22.05+): passed on explicitly.
  if [[ -n "${SLURM_CPUS_PER_TASK:-}" ]]; then srun_cmd+=(--cpus-per-task="$SLURM_CPUS_PER_TASK"); fi
  # The repository's launch.sh, not sbatch's spool copy (which the other nodes do not have).
  srun_cmd+=(bash "$here/launch.sh" "${launch_opts[@]}" -- "${train_args[@]}")
  if [[ "$dry_run" == 1 ]]; then
    echo "launch.sh: the batch script would run: $(printf '%q ' "${srun_cmd[@]}")" >&2
    for ((node = 0; node < nnodes; node++)); do
      build_command "$node"
      print_command "${hosts[node]}"
    done
    exit 0
  fi
  command -v srun >/dev/null || die "SLURM_JOB_ID is set but srun is not found; outside SLURM, unset SLURM_JOB_ID"
  mkdir -p logs  # for the next submission: this job's log was opened before the script ran
  # Slurm signals the batch shell on its own only with --signal=B:..., on a time limit or on
  # scancel; srun passes what it gets on to every process of the step (each node's launcher
  # ignores SIGUSR1 and forwards SIGTERM, the workers save). The traps are set before srun starts
  # (it gets default handlers back) so that no signal can kill the shell before they are.
  # SIGTERM is not passed on: on a time limit, preemption or scancel Slurm sends it to every
  # process of the step itself, and a second copy through srun would reach each node's launcher
  # during its graceful stop (torch's elastic agent cuts that stop short on a repeated SIGTERM).
  # The shell ignores it and waits for the step; stop a job with scancel.
  step=""
  # shellcheck disable=SC2317  # called from the traps below, which shellcheck does not follow
  forward() { if [[ -n "$step" ]]; then kill -s "$1" "$step" 2>/dev/null || true; fi; }
  for sig in USR1 USR2 HUP; do
    # shellcheck disable=SC2064  # $sig is meant to be expanded now
    trap "forward $sig" "$sig"
  done
  trap ':' TERM  # a handler, not '' (which srun would inherit): the shell survives and keeps waiting
  trap "forward TERM" INT  # one SIGINT only makes srun print the tasks' state: stop the step instead
  MMTRAIN_LAUNCH_TASK=1 "${srun_cmd[@]}" &
  step=$!
  # The shell waits until srun is gone.
  while kill -0 "$step" 2>/dev/null; do
    wait "$step" || true  # returns early when a trapped signal arrives
  done
  status=0
  wait "$step" || status=$?  # bash keeps the exit status of a finished background job
  exit "$status"
fi

# ---- this machine (or this node's task of a SLURM step) ----------------------------------------
build_command "${rank:-0}"
if [[ "$dry_run" == 1 ]]; then
  if [[ $slurm_mode == task ]] && ((nnodes > 1)); then
    print_command "${hosts[rank]}"
  else
    print_command
  fi
  exit 0
fi
# SLURM's pre-timeout signal (#SBATCH --signal=USR1@120) reaches every process of the job step. The
# launcher has no handler for it and would die, orphaning the workers; ignored here (inherited
# across exec), it reaches only the workers, which save, requeue and exit 0 (mmtrain installs its
# own handler). SIGTERM is the launcher's to forward: it passes it on to the workers.
trap '' USR1
exec "${cmd[@]}"
