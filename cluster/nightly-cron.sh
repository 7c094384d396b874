#!/usr/bin/env bash
# Nightly audit of a growing dataset: only the images that arrived since the last run are
# explained; the summary and the report are brought up to date. Install with `crontab -e`:
#
#   15 2 * * *  /opt/xai-workers/cluster/nightly-cron.sh >> /var/log/xai-audit-nightly.log 2>&1
#
# It submits to a running Ray cluster (RAY_ADDRESS, e.g. http://head:8265) with the cluster's
# token (RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH, see docs/operations.md). A second run while
# one is still going is refused (the output's lock names it), so overlapping nights are safe.
set -euo pipefail
: "${RAY_ADDRESS:?set RAY_ADDRESS to the job server of the cluster, e.g. http://head:8265}"
INPUT=${INPUT:-s3://my-bucket/images/}
OUTPUT=${OUTPUT:-s3://my-bucket/audits/resnet50}
MODEL=${MODEL:-torchvision:resnet50}
WEIGHTS=${WEIGHTS:-s3://my-bucket/models/resnet50.pt}
ray job submit --address "$RAY_ADDRESS" -- \
    xai-audit run --input "$INPUT" --output "$OUTPUT" --model "$MODEL" --weights "$WEIGHTS" \
    --incremental --max-error-rate 0.01
