#!/usr/bin/env bash
# Submit `hakd run` to a Ray cluster started with `ray up infra/cluster.yaml`.
# The job server listens on the head's 127.0.0.1:8265 only: forward it over SSH first.
#   infra/submit.sh infra/configs/paper_cifar10.yaml runs/cifar10
set -euo pipefail
config=${1:?usage: infra/submit.sh CONFIG OUT}
out=${2:?usage: infra/submit.sh CONFIG OUT}
ray dashboard infra/cluster.yaml --port 8265 >/dev/null 2>&1 &   # SSH tunnel to the head's dashboard/job server
tunnel=$!
trap 'kill $tunnel' EXIT
sleep 3
ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
  .venv/bin/hakd run --config "$config" --out "$out" ray.address=auto
