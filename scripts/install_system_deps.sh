#!/usr/bin/env bash
# Debian packages the test suite uses: a real SLURM cluster (slurmctld, slurmd, munge) and
# headless Chromium for the MLflow UI test. Installs only what is missing; without root or
# apt it says so and the tests that need these packages skip with a reason.
set -euo pipefail
packages=(slurmctld slurmd slurm-client munge chromium)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
  echo "install_system_deps: not root or no apt-get; missing ${missing[*]} (tests needing them skip)" >&2
  exit 0
fi
echo "install_system_deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq || true
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
