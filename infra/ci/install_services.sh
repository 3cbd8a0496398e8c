#!/usr/bin/env bash
# Install the system services the integration tests start on loopback (Debian/Ubuntu, as root):
#   SLURM (slurmctld, slurmd, slurm-client) + munge  -> tests/test_slurm.py (a one-node cluster)
#   PostgreSQL                                       -> tests/test_mlflow_team.py (MLflow's backend store)
# Where they cannot be installed (no root, no apt), those tests skip and say why.
set -euo pipefail
need=()
command -v slurmctld >/dev/null 2>&1 || need+=(slurmctld)
command -v slurmd >/dev/null 2>&1 || need+=(slurmd)
command -v sbatch >/dev/null 2>&1 || need+=(slurm-client)
command -v munged >/dev/null 2>&1 || need+=(munge)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
if [ ${#need[@]} -eq 0 ]; then
  echo "services: SLURM, munge and PostgreSQL already installed"
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "services: cannot install ${need[*]} (needs root and apt-get); the tests that need them will skip" >&2
  exit 0
fi
echo "services: installing ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends ${need[@]+"${need[@]}"} >/dev/null
