#!/usr/bin/env bash
# Reproduction commands for the Multi30k EN->FR T5 backbones (issue 3). One CPU thread each.
# Rerunning a command resumes from its last checkpoint (kept in .cache/train_resume/); a finished
# run exits at once. Outputs: checkpoints/<name>/{model.safetensors,config.json,tokenizer*.json,
# train_config.json,train_log.csv}; load with calm_utils.t5_model.load_t5("checkpoints/<name>").
#
#   scripts/train_t5.sh calm   # CALM's weighted per-layer loss, 105 min  -> checkpoints/t5_calm/
#   scripts/train_t5.sh last   # last-layer-only loss (ablation), 45 min -> checkpoints/t5_last/
#   scripts/train_t5.sh smoke  # tiny model, ~1 min                      -> /tmp/t5_smoke/
#
# In the study both full runs ran in the background, the ablation started once the first was
# confirmed healthy (2-core machine shared with other jobs):
#   nohup python -m calm_utils.train --config full --loss calm --threads 1 --max-minutes 105 > runs/t5_calm.log 2>&1 &
#   nohup python -m calm_utils.train --config full --loss last --threads 1 --max-minutes 45  > runs/t5_last.log 2>&1 &
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p runs
case "${1:-calm}" in
  calm)  python -m calm_utils.train --config full --loss calm --threads 1 --max-minutes 105 2>&1 | tee -a runs/t5_calm.log ;;
  last)  python -m calm_utils.train --config full --loss last --threads 1 --max-minutes 45 2>&1 | tee -a runs/t5_last.log ;;
  smoke) python -m calm_utils.train --config smoke --loss calm --threads 1 --out /tmp/t5_smoke ;;
  *) echo "usage: $0 calm|last|smoke" >&2; exit 2 ;;
esac
