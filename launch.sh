#!/usr/bin/env bash
# Start an fpcd experiment on a SLURM GPU cluster, on every worker of a TPU VM slice, or locally.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch.sh [--slurm|--tpu NAME --zone ZONE|--local [--processes N]] [--nodes N] [--gpus-per-node G]
                 [--time HH:MM:SS] [--partition P] -- [main.py flags]

Runs `python experiments/main.py <main.py flags>` data-parallel over all accelerators.

  --local              run here (default); every local device is used.
  --processes N        with --local: start N processes on this machine joined by jax.distributed
                       (coordinator on 127.0.0.1, a free port; CPU collectives over gloo; on a GPU
                       machine process i sees GPU i), each
                       feeding its own share of every batch, exactly as the N nodes of a cluster
                       job would. Only process 0 writes files and prints; if one process fails,
                       the others are stopped. Try a cluster job this way before submitting it:
                         ./launch.sh --local --processes 2 -- --config=experiments/gmm.py:tiny
  --slurm              submit with sbatch: one task per node (--nodes N, default 1), each task sees
                       --gpus-per-node G GPUs (default 8); jax.distributed.initialize() picks up the
                       SLURM environment, so every process trains on its share of each batch.
  --tpu NAME           run on every worker of the TPU VM slice NAME (gcloud compute tpus tpu-vm ssh
                       --worker=all); needs --zone. The repository must be at the same path there.
  --time, --partition  passed to sbatch.

Everything after `--` goes to experiments/main.py, e.g.
  ./launch.sh --slurm --nodes 2 -- --config=experiments/jetnet.py:full --workdir=/scratch/jets
  ./launch.sh --tpu my-v4-32 --zone us-central2-b -- --config=experiments/calo.py:full --workdir=gs://b/calo
  ./launch.sh -- --config=experiments/gmm.py --workdir=runs/gmm
A killed or preempted run resumes from its newest checkpoint when started again with the same workdir.
USAGE
}

mode=local processes=1 nodes=1 gpus=8 walltime=24:00:00 partition="" tpu="" zone=""
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --local) mode=local ;;
    --slurm) mode=slurm ;;
    --tpu) mode=tpu; tpu="$2"; shift ;;
    --zone) zone="$2"; shift ;;
    --processes) processes="$2"; shift ;;
    --nodes) nodes="$2"; shift ;;
    --gpus-per-node) gpus="$2"; shift ;;
    --time) walltime="$2"; shift ;;
    --partition) partition="$2"; shift ;;
    --) shift; break ;;
    *) echo "launch.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

repo="$(cd "$(dirname "$0")" && pwd)"
main_args=("$@")
quoted=$(printf ' %q' "${main_args[@]+"${main_args[@]}"}")

case "$mode" in
  local)
    case "$processes" in ''|*[!0-9]*|0) echo "launch.sh: --processes needs a positive integer, got '$processes'" >&2; exit 2 ;; esac
    if [ "$processes" -eq 1 ]; then
      exec python "$repo/experiments/main.py" "${main_args[@]+"${main_args[@]}"}"
    fi
    port=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    pids=()
    for ((i = 0; i < processes; i++)); do
      # On a GPU machine process i gets GPU i (unless CUDA_VISIBLE_DEVICES is already set).
      if [ -z "${CUDA_VISIBLE_DEVICES+x}" ] && command -v nvidia-smi >/dev/null; then gpu=(CUDA_VISIBLE_DEVICES="$i"); else gpu=(); fi
      env "${gpu[@]+"${gpu[@]}"}" JAX_COORDINATOR_ADDRESS="127.0.0.1:$port" JAX_NUM_PROCESSES="$processes" \
        JAX_PROCESS_ID="$i" python "$repo/experiments/main.py" "${main_args[@]+"${main_args[@]}"}" &
      pids+=("$!")
    done
    trap 'kill "${pids[@]}" 2>/dev/null; wait; exit 130' INT TERM
    status=0
    for ((done_count = 0; done_count < processes; done_count++)); do
      code=0
      wait -n || code=$?
      if [ "$code" -ne 0 ] && [ "$status" -eq 0 ]; then
        status=$code
        echo "launch.sh: a process exited with status $code; stopping the others" >&2
        kill "${pids[@]}" 2>/dev/null || true
      fi
    done
    exit "$status"
    ;;
  slurm)
    command -v sbatch >/dev/null || { echo "launch.sh: sbatch not found: not on a SLURM login node" >&2; exit 1; }
    extra=()
    [ -n "$partition" ] && extra+=(--partition="$partition")
    sbatch "${extra[@]+"${extra[@]}"}" --job-name=fpcd --nodes="$nodes" --ntasks-per-node=1 \
      --gpus-per-node="$gpus" --time="$walltime" --output="fpcd-%j.out" \
      --wrap="cd $(printf %q "$repo") && srun python experiments/main.py$quoted"
    ;;
  tpu)
    [ -n "$zone" ] || { echo "launch.sh: --tpu needs --zone" >&2; exit 2; }
    command -v gcloud >/dev/null || { echo "launch.sh: gcloud not found" >&2; exit 1; }
    gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all \
      --command="cd $(printf %q "$repo") && python experiments/main.py$quoted"
    ;;
esac
