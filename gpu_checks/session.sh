#!/usr/bin/env bash
# One device session's run, prepared for the `run` tool (15 minutes of GPU
# time in all, at most 8 files back from $OUT): gpu_checks/run.sh, cut off
# after RUN_LIMIT seconds (default 540), then gpu_checks/chainermn.sh if
# fewer than CHAINERMN_BEFORE seconds (default 360) have passed, cut off
# SESSION_LIMIT seconds (default 570) after the start; everything packed
# into $OUT/gpu-results.tar.gz, after each part, with run.sh's log beside
# it. From the project root, with .devkit/ carried:
#   run(command="bash gpu_checks/session.sh", carry=[".devkit"], timeout_s=600)
# Unpack the tarball into results/gpu/ here (the chainermn/ part beside it).
set -uo pipefail
cd "$(dirname "$0")/.."
DEST="${OUT:-/tmp/out}"
WORK="$(mktemp -d)"
mkdir -p "$DEST" "$WORK/gpu" "$WORK/chainermn"
START=$SECONDS
pack() {
  # Snapshots and model files stay behind: the logs and tables come back.
  tar -C "$WORK" -czf "$DEST/gpu-results.tar.gz" \
      --exclude='*.npz' --exclude='snapshot_*' --exclude='model_*' .
  cp "$WORK/gpu/gpu-checks.log" "$DEST/"
}
# Cut off (with every process it started) in time to pack what it wrote.
OUT="$WORK/gpu" timeout "${RUN_LIMIT:-540}" bash gpu_checks/run.sh 2>&1 \
    | tee "$WORK/gpu/gpu-checks.log"
if (( PIPESTATUS[0] == 124 )); then
  echo "run.sh cut off after ${RUN_LIMIT:-540} s" \
      | tee -a "$WORK/gpu/gpu-checks.log"
fi
pack   # already there if the ChainerMN part runs past the call's limit
LEFT=$(( ${SESSION_LIMIT:-570} - (SECONDS - START) ))
if (( SECONDS - START < ${CHAINERMN_BEFORE:-360} )); then
  OUT="$WORK/chainermn" timeout "$LEFT" bash gpu_checks/chainermn.sh \
      > /dev/null 2>&1
  tail -40 "$WORK/chainermn/chainermn-gpu.log"
  pack
else
  echo "chainermn.sh skipped: $((SECONDS - START)) s had passed"
fi
echo "session: $((SECONDS - START)) s"
