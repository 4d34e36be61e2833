#!/usr/bin/env bash
# Start an fpcd experiment on a SLURM GPU cluster, on every worker of a TPU VM slice, or locally.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch.sh [--slurm|--tpu NAME --zone ZONE|--local] [--nodes N] [--gpus-per-node G]
                 [--time HH:MM:SS] [--partition P] -- [main.py flags]

Runs `python experiments/main.py <main.py flags>` data-parallel over all accelerators.

  --local              run here (default); every local device is used.
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

mode=local nodes=1 gpus=8 walltime=24:00:00 partition="" tpu="" zone=""
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --local) mode=local ;;
    --slurm) mode=slurm ;;
    --tpu) mode=tpu; tpu="$2"; shift ;;
    --zone) zone="$2"; shift ;;
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
    exec python "$repo/experiments/main.py" "${main_args[@]+"${main_args[@]}"}"
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
