#!/usr/bin/env bash
# What tracing costs: CPU per request of one binary with tracing off (A)
# against tracing on (B) at sampling ratios 0, 0.01 and 1, spans sent to an
# OTLP/HTTP sink (loadtest/otlp_sink.py) on core 1. Same pinning and wrk
# settings as ab.sh (medians of ROUNDS); 1 KiB objects by default.
#
#   bash loadtest/tracing.sh target/release/yatagarasu
set -euo pipefail
BIN=$1
SINK_PORT=18190
python3 "$(dirname "$0")/otlp_sink.py" "$SINK_PORT" &
SINK=$!
trap 'kill $SINK 2>/dev/null || true' EXIT
for ratio in 0 0.01 1; do
  echo "### sampling_ratio $ratio"
  EXTRA_YAML_B="observability:
  tracing:
    enabled: true
    otlp_endpoint: \"http://127.0.0.1:$SINK_PORT\"
    sampling_ratio: $ratio
" SIZES=${SIZES:-1k} bash "$(dirname "$0")/ab.sh" "$BIN" "$BIN" off "ratio-$ratio"
done
