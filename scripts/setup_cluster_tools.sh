#!/usr/bin/env bash
# Slurm (slurmctld, slurmd, client), munge and Open MPI for the cluster-tier tests
# (tests/test_launchers.py starts a two-node loopback Slurm and an mpirun job with them).
#
#   bash scripts/setup_cluster_tools.sh    # what .ci/run and the README's test command run
#
# Installs Debian's packages when any tool is missing and this user can (root with apt-get); otherwise
# it says what is missing and succeeds: those tests then skip and name this script. The tests
# themselves never install anything.
set -uo pipefail
need=()
for tool in slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client munged:munge mpirun:openmpi-bin; do
  command -v "${tool%%:*}" >/dev/null 2>&1 || need+=("${tool##*:}")
done
if [ ${#need[@]} -eq 0 ]; then
  echo "[setup_cluster_tools] Slurm, munge and Open MPI are installed"
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "[setup_cluster_tools] missing ${need[*]} and cannot install them here (needs root and apt-get):" \
       "the cluster-tier tests will skip" >&2
  exit 0
fi
echo "[setup_cluster_tools] installing ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
timeout 900 apt-get update -qq && timeout 900 apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null || {
  echo "[setup_cluster_tools] apt-get install ${need[*]} failed: the cluster-tier tests will skip" >&2
  exit 0
}
