#!/usr/bin/env bash
# Submit `zsaq quantize CONFIG` to a Ray cluster through the Ray Job API, follow its logs and
# exit with the job's status.
#
#   launch/submit.sh [--address http://127.0.0.1:8265] [--submission-id ID] [--env K=V ...]
#                    [--pip SPEC ...] [--no-wait] CONFIG.yaml [--set key=value ...]
#
# The config (with the --set overrides) is validated here first when zsaq_dist is importable,
# so a typo fails in a second instead of after the cluster has started the job. The config file
# is shipped as the job's runtime_env working_dir (a staging directory holding only that file),
# so the cluster needs the package installed (docker/Dockerfile) but not this checkout.
# --env adds job environment variables (visible in the dashboard: no secrets); --pip adds
# packages on top of the cluster's environment for this job only (e.g. --pip s3fs==2026.9.0
# for an s3:// output.dir). On a cluster with token authentication (Ray's default when
# ~/.ray/auth_token exists) export RAY_AUTH_MODE=token, with the token in ~/.ray/auth_token or
# RAY_AUTH_TOKEN.
#
# Exit status: 0 job SUCCEEDED (or submitted, with --no-wait); 1 job FAILED or STOPPED;
# 2 usage or config error (nothing submitted); 130 interrupted (the job is stopped first).
# Environment: RAY (ray CLI, default `ray`), PYTHON (interpreter with ray, default `python3`).
set -euo pipefail

usage() {
  sed -n '5,6p' "$0" | sed 's/^# \{0,1\}//' >&2
  echo "see the header of $0 for details" >&2
  exit 2
}

die() { echo "submit.sh: $*" >&2; exit 2; }

address="http://127.0.0.1:8265"
submission_id=""
no_wait=0
env_pairs=()
pip_specs=()
config=""
sets=()

while [[ $# -gt 0 ]]; do
  case "$1" in
    --address) [[ $# -ge 2 ]] || die "--address needs a URL, e.g. --address http://127.0.0.1:8265"
               address="$2"; shift 2 ;;
    --address=*) address="${1#*=}"; shift ;;
    --submission-id) [[ $# -ge 2 ]] || die "--submission-id needs a value"; submission_id="$2"; shift 2 ;;
    --env) [[ $# -ge 2 && "$2" == *=* ]] || die "--env needs KEY=VALUE, e.g. --env HF_HUB_OFFLINE=1"
           env_pairs+=("$2"); shift 2 ;;
    --pip) [[ $# -ge 2 ]] || die "--pip needs a requirement, e.g. --pip s3fs==2026.9.0"
           pip_specs+=("$2"); shift 2 ;;
    --no-wait) no_wait=1; shift ;;
    --set) [[ $# -ge 2 && "$2" == *=* ]] || die "--set needs key=value, e.g. --set quant.weights.bits=3"
           [[ -n "$config" ]] || die "give CONFIG.yaml before --set"
           sets+=("$2"); shift 2 ;;
    --set=*) [[ -n "$config" ]] || die "give CONFIG.yaml before --set"; sets+=("${1#*=}"); shift ;;
    -h|--help) usage ;;
    -*) die "unknown option $1 (options: --address, --submission-id, --env, --pip, --no-wait, --set)" ;;
    *) [[ -z "$config" ]] || die "only one CONFIG.yaml, got '$config' and '$1'"; config="$1"; shift ;;
  esac
done

[[ -n "$config" ]] || usage
[[ -f "$config" ]] || die "config file $config not found: pass the path of a YAML recipe, e.g. configs/quickstart.yaml"
[[ "$address" =~ ^https?:// ]] || die "--address must be the dashboard URL, e.g. http://127.0.0.1:8265 (got '$address')"

RAY="${RAY:-ray}"
PYTHON="${PYTHON:-python3}"
command -v "$RAY" >/dev/null || die "'$RAY' not found: install ray[default] or set RAY=/path/to/ray"

# Validate locally when the package is importable (config errors exit 2, nothing is submitted).
if "$PYTHON" -c "import zsaq_dist.config" 2>/dev/null; then
  "$PYTHON" - "$config" "${sets[@]}" <<'PY' || exit 2
import sys
from zsaq_dist.config import load_config
from zsaq_dist.errors import ZsaqError
try:
    load_config(sys.argv[1], sys.argv[2:])
except ZsaqError as err:
    print(f"submit.sh: {err}", file=sys.stderr)
    sys.exit(2)
PY
fi

stage="$(mktemp -d "${TMPDIR:-/tmp}/zsaq-submit.XXXXXX")"
trap 'rm -rf "$stage"' EXIT
cfg_name="$(basename "$config")"
cp "$config" "$stage/$cfg_name"

[[ -n "$submission_id" ]] || submission_id="zsaq-$(date -u +%Y%m%d-%H%M%S)-$$"

# runtime_env as JSON, built by Python so values with quotes or spaces survive.
runtime_env="$("$PYTHON" - "$stage" "${#env_pairs[@]}" "${env_pairs[@]}" "${pip_specs[@]}" <<'PY'
import json, sys
n_env = int(sys.argv[2])
env = {"PYTHONUNBUFFERED": "1"}
env.update(pair.split("=", 1) for pair in sys.argv[3 : 3 + n_env])
runtime_env = {"working_dir": sys.argv[1], "env_vars": env}
if sys.argv[3 + n_env :]:
    runtime_env["pip"] = sys.argv[3 + n_env :]
print(json.dumps(runtime_env))
PY
)"

entry=(zsaq quantize "$cfg_name")
for kv in "${sets[@]}"; do entry+=(--set "$kv"); done

echo "submission id: $submission_id"
echo "address: $address"

submit_pid=""
stop_job() {
  echo "submit.sh: interrupted, stopping job $submission_id" >&2
  [[ -n "$submit_pid" ]] && kill "$submit_pid" 2>/dev/null
  "$RAY" job stop --address "$address" "$submission_id" >&2 || true
  exit 130
}
trap stop_job INT TERM

submit_args=(job submit --address "$address" --submission-id "$submission_id"
             --runtime-env-json "$runtime_env")
if [[ "$no_wait" -eq 1 ]]; then submit_args+=(--no-wait); fi

# In the background + wait, so a TERM from a scheduler runs stop_job at once.
"$RAY" "${submit_args[@]}" -- "${entry[@]}" &
submit_pid=$!
set +e
wait "$submit_pid"
submit_rc=$?
set -e
submit_pid=""
if [[ "$no_wait" -eq 1 ]]; then exit "$submit_rc"; fi

# `ray job submit` exits 0 for a STOPPED job: ask for the final status explicitly.
status="$("$PYTHON" - "$address" "$submission_id" <<'PY' 2>/dev/null || true
import sys
from ray.job_submission import JobSubmissionClient
print(JobSubmissionClient(sys.argv[1]).get_job_status(sys.argv[2]).value)
PY
)"
echo "job $submission_id: ${status:-UNKNOWN (ray job submit exited $submit_rc)}"
[[ "$status" == "SUCCEEDED" ]] || exit 1
