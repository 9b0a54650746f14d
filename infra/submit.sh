#!/usr/bin/env bash
# Submit `hakd run` to a Ray cluster started with `ray up infra/cluster.yaml`.
#
#   infra/submit.sh CONFIG OUT [key.sub=value ...]
#   infra/submit.sh infra/configs/paper_cifar10.yaml /mnt/hakd/runs/cifar10 data.root=/mnt/hakd/data
#
# CONFIG  a YAML config on this machine; it is copied to the head node.
# OUT     the run's directory: an absolute path on the shared mount (/mnt/hakd/... in infra/cluster.yaml).
#         A relative path would land on one node's own disk. To keep the stores and fitted teachers in
#         an object store instead, add the override cache.location=s3://bucket/prefix (OUT stays a path:
#         each training node packs its own FFCV copy under it).
# AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_DEFAULT_REGION, AWS_ENDPOINT_URL
#         are passed to the job when set here (for s3://; an instance profile on the nodes needs none).
# CLUSTER_YAML  the cluster config (default infra/cluster.yaml).
#
# The project is installed on every node by cluster.yaml, so the job runs the installed `hakd`: no
# working directory is uploaded. The job server listens on the head's 127.0.0.1:8265 only; this
# script forwards it over SSH for the submission and closes the tunnel after.
set -euo pipefail
usage="usage: infra/submit.sh CONFIG OUT [key.sub=value ...]"
config=${1:?$usage}
out=${2:?$usage}
shift 2
cluster=${CLUSTER_YAML:-infra/cluster.yaml}

fail() { echo "submit.sh: error: $*" >&2; exit 2; }
[[ -f $config ]] || fail "config $config does not exist; give a YAML file (examples in infra/configs/)"
[[ -f $cluster ]] || fail "cluster config $cluster does not exist; set CLUSTER_YAML"
case $out in
  /*) ;;
  *://*) fail "OUT $out must be a path; put an object store in the override cache.location=$out instead" ;;
  *) fail "OUT $out must be an absolute path on the shared mount (e.g. /mnt/hakd/runs/NAME)" ;;
esac
for arg in "$@"; do
  [[ $arg == *=* ]] || fail "extra argument $arg is not a key.sub=value override"
done
command -v ray >/dev/null || fail "the ray command is not installed here (pip install 'ray[default]==2.60.0' boto3)"

remote_config="/tmp/hakd-configs/$(basename "$config")"
ray exec "$cluster" "mkdir -p /tmp/hakd-configs"
ray rsync-up "$cluster" "$config" "$remote_config"

# credentials for an object store, only those set here
env_json=$(python3 - <<'PY'
import json, os
keys = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")
print(json.dumps({"env_vars": {k: os.environ[k] for k in keys if os.environ.get(k)}}))
PY
)

ray dashboard "$cluster" --port 8265 >/dev/null 2>&1 &   # SSH tunnel to the head's dashboard and job server
tunnel=$!
trap 'kill "$tunnel" 2>/dev/null || true' EXIT
for _ in $(seq 60); do
  curl -sf http://127.0.0.1:8265/api/version >/dev/null && break
  sleep 1
done
curl -sf http://127.0.0.1:8265/api/version >/dev/null || fail "no job server at 127.0.0.1:8265 through the SSH tunnel; is the cluster up (ray up $cluster)?"

quoted=$(printf ' %q' "$@")
ray job submit --address http://127.0.0.1:8265 --runtime-env-json "$env_json" --no-wait -- \
  "hakd run --config $(printf %q "$remote_config") --out $(printf %q "$out") ray.address=auto${quoted}"
echo "follow it: ray dashboard $cluster (then http://127.0.0.1:8265), or ray job logs --address http://127.0.0.1:8265 -f JOB_ID"
