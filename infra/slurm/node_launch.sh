#!/usr/bin/env bash
# The per-node launcher of infra/slurm/train.sbatch: srun starts it once per node (--ntasks-per-node=1)
# with the batch script's environment; it starts that node's training processes.
#
#   GPU nodes (GOLF_GPUS_PER_NODE > 0):
#     accelerate launch --config_file $ACCELERATE_CONFIG --num_machines N --num_processes N*GPUS
#         --machine_rank $SLURM_NODEID --main_process_ip HEAD --main_process_port PORT launch/train.py ARGS
#     through `python -m golf_dist.commands.launch accelerate-launch`: one process in all (single_gpu.yaml) runs
#     with no launcher process at all (the trainer is exec'd with the environment Accelerate builds for it).
#   CPU nodes (GOLF_GPUS_PER_NODE = 0): ACCELERATE_USE_CPU=1 torchrun (gloo) with a c10d rendezvous at
#     HEAD:PORT, --nproc_per_node $GOLF_CPU_PROCS, join_timeout=$GOLF_RDZV_TIMEOUT, through
#     `python -m golf_dist.commands.launch torchrun`, which ends a rendezvous that cannot form with one clear
#     error line instead of a hang or a bare traceback.
#
# Needs GOLF_ROOT, GOLF_HEAD, GOLF_PORT, GOLF_NNODES, GOLF_GPUS_PER_NODE (set by train.sbatch) and
# SLURM_NODEID (set by srun). Arguments: those of launch/train.py.
#
# SIGTERM (scancel, the time limit, preemption with a grace time) reaches every process of this job step,
# and srun forwards its own as well. The training processes take it themselves: they finish the step,
# checkpoint, write the PREEMPTED marker and exit 0. The launcher must outlive them, so it runs with SIGTERM
# ignored (an ignored signal stays ignored across exec and in the children, which install their own handler)
# and torchrun's agent (also the one inside `accelerate launch` with several processes) is told not to handle
# it (PET_SIGNALS_TO_HANDLE, read by torch >= 2.9; with an older torch the launcher says so at start).
# Otherwise the agent forwards it, takes the next SIGTERM as "exit now" and exits 1, and srun
# --kill-on-bad-exit then kills the step with the trainer in it, mid-checkpoint. `accelerate launch` with one
# process installs its own SIGTERM handler (accelerate >= 1.16) and kills its child: so a single process is
# started without it.
set -euo pipefail
: "${GOLF_ROOT:?set by train.sbatch}" "${GOLF_HEAD:?set by train.sbatch}" "${GOLF_PORT:?set by train.sbatch}"
: "${GOLF_NNODES:?set by train.sbatch}" "${GOLF_GPUS_PER_NODE:?set by train.sbatch}"
NODE_RANK=${SLURM_NODEID:?run by srun (SLURM_NODEID is not set)}
PY=${GOLF_PYTHON:-python3}
TIMEOUT=${GOLF_RDZV_TIMEOUT:-300}
cd "$GOLF_ROOT"
trap '' TERM
export PET_SIGNALS_TO_HANDLE=SIGINT,SIGHUP,SIGQUIT

if [ "$GOLF_GPUS_PER_NODE" -gt 0 ]; then
  : "${ACCELERATE_CONFIG:?set by train.sbatch}"
  rdzv=()
  # several nodes meet through c10d with a bounded wait; one node needs no rendezvous timeout
  [ "$GOLF_NNODES" -gt 1 ] && rdzv=(--rdzv_backend c10d --rdzv_conf "join_timeout=$TIMEOUT")
  # ${rdzv[@]+"${rdzv[@]}"}, not "${rdzv[@]}": bash before 4.4 takes an empty array as unset under set -u
  exec "$PY" -m golf_dist.commands.launch accelerate-launch -- --config_file "$ACCELERATE_CONFIG" \
    --num_machines "$GOLF_NNODES" --num_processes $((GOLF_NNODES * GOLF_GPUS_PER_NODE)) \
    --machine_rank "$NODE_RANK" --main_process_ip "$GOLF_HEAD" --main_process_port "$GOLF_PORT" \
    ${rdzv[@]+"${rdzv[@]}"} launch/train.py "$@"
fi

export ACCELERATE_USE_CPU=1
exec "$PY" -m golf_dist.commands.launch torchrun -- \
  --nnodes "$GOLF_NNODES" --node_rank "$NODE_RANK" --nproc_per_node "${GOLF_CPU_PROCS:-1}" \
  --rdzv-backend c10d --rdzv-endpoint "$GOLF_HEAD:$GOLF_PORT" --rdzv-id "golf-${SLURM_JOB_ID:-local}" \
  --rdzv-conf "join_timeout=$TIMEOUT" \
  launch/train.py "$@"
