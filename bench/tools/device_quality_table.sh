#!/usr/bin/env bash
set -uo pipefail
# Device call of the quality runs (bench/notes/quality.md, "Getting the model onto the device"): join + prepare the
# model once per warm machine, then up to three tables in parallel on the one GPU (each run is host-bound at this
# model size), each resumable with --resume. Job A: the tweets' own text as Stage-2 corpus; B: the learning-rate
# sweep; C: the docs-corpus row at seed 43; D: EPOCHS epochs of Stage 3 (teacher at one); E: BitNet-SFT at EPOCHS
# epochs, D's baseline. $1 = minutes of budget, $2 = jobs.
# Before it, one call carrying the folder with part 1 (first 50,000,000 bytes of the GGUF) and data.tgz runs:
#   cp $PART1_DIR/part1 /tmp/part1 && tar xzf $PART1_DIR/data.tgz
# This call carries $PART2_DIR (default .gpu2): part2 (the rest), gguf.sha256 and the gguf wheel.
# Usage: BITKERNELS_GIT_COMMIT=<sha> [EPOCHS=n] bash bench/tools/device_quality_table.sh MINUTES JOBS   (JOBS: A-E)
: "${BITKERNELS_GIT_COMMIT:?set BITKERNELS_GIT_COMMIT to the commit being run (the device copy has no .git)}"
P2=${PART2_DIR:-.gpu2}
export PYTHONPATH=/tmp/site:$PWD OMP_NUM_THREADS=4 TOKENIZERS_PARALLELISM=false
BUDGET=${1:-7.5}
JOBS=${2:-ABC}
EPOCHS=${EPOCHS:-2}   # Stage-3 / BitNet-SFT epochs of jobs D and E
if [ ! -d /tmp/site/gguf ]; then pip install -q --no-deps --target /tmp/site $P2/gguf-*.whl || exit 11; fi
if [ ! -f data/models/smollm2-135m/config.json ]; then
  cat /tmp/part1 $P2/part2 > /tmp/smol.gguf
  echo "$(cat $P2/gguf.sha256)  /tmp/smol.gguf" | sha256sum -c || exit 12
  t=$(date +%s); python -m bitdistill.prepare smollm2 --gguf /tmp/smol.gguf || exit 13; echo "prepare $(( $(date +%s)-t )) s"
fi
CFG=bitdistill/configs/smollm2-135m-tweets.yaml
BEST="--set task.max_train_examples=12000 --set distill.gamma_ad=1000 --set distill.kd_positions=answer"
mkdir -p outputs/logs; touch /tmp/call_start
# A: the teacher, then BitDistill with the tweets' own training text added to the Stage-2 corpus (Austen + KJV + tweets).
if [[ $JOBS == *A* ]]; then
python bench/bench_quality.py --config $CFG --resume --time_budget_min $BUDGET --rows FP-SFT,BitDistill \
  --name smollm2-135m-tweets-indomain $BEST --set output_dir=outputs/tw-indomain2 \
  --set "pretrain.corpus.files=[data/tasks/tweets/train.jsonl]" > outputs/logs/A.log 2>&1 &
fi
# B: the learning-rate sweep of both baselines, then FP-SFT and BitNet-SFT at the chosen rates.
if [[ $JOBS == *B* ]]; then
python bench/bench_quality.py --config $CFG --resume --time_budget_min $BUDGET --rows FP-SFT,BitNet-SFT --sweep \
  --name smollm2-135m-tweets-sweep --set task.max_train_examples=12000 --set output_dir=outputs/tw-sweep \
  > outputs/logs/B.log 2>&1 &
fi
# C: a second seed of the best measured row (docs corpus): its own teacher, Stage 2 and Stage 3 at seed 43.
if [[ $JOBS == *C* ]]; then
python bench/bench_quality.py --config $CFG --resume --time_budget_min $BUDGET --rows FP-SFT,BitDistill --seeds 43 \
  --name smollm2-135m-tweets-docs-seed43 $BEST --set output_dir=outputs/tw-docs-s43 \
  --set "pretrain.corpus.files=[data/corpus/docs.jsonl]" > outputs/logs/C.log 2>&1 &
fi
# D: the same data seen EPOCHS times (default 2) in BitDistill's Stage 3 (12,000 tweets, Stage 2 unchanged). The teacher
# stays at 1 epoch: at 2 it scored no higher, and 1 is the teacher of every other row. Run it alone on the GPU with the
# budget bench/notes/quality.md gives.
if [[ $JOBS == *D* ]]; then
python bench/bench_quality.py --config $CFG --resume --time_budget_min $BUDGET --rows FP-SFT,BitDistill \
  --name smollm2-135m-tweets-${EPOCHS}epochs-distill $BEST --set output_dir=outputs/tw-${EPOCHS}ep-distill \
  --set distill.epochs=$EPOCHS \
  > outputs/logs/D.log 2>&1 &
fi
# E: BitNet-SFT at EPOCHS epochs, the baseline D is held against.
if [[ $JOBS == *E* ]]; then
python bench/bench_quality.py --config $CFG --resume --time_budget_min $BUDGET --rows BitNet-SFT \
  --name smollm2-135m-tweets-${EPOCHS}epochs-bitnet-sft --set task.max_train_examples=12000 \
  --set output_dir=outputs/tw-${EPOCHS}ep-bn --set bitnet_sft.epochs=$EPOCHS > outputs/logs/E.log 2>&1 &
fi
while sleep 30; do nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader; \
  jobs -r | wc -l | grep -q '^0$' && break; done
wait
mkdir -p $OUT/quality $OUT/logs
find bench/results/quality -newer /tmp/call_start -type f -exec cp {} $OUT/quality/ \;
cp outputs/logs/*.log $OUT/logs/
find outputs -name "result.json" -o -name "history.json" -o -name "sweep.json" | tar czf $OUT/runs.tgz -T -
for l in $(echo $JOBS | grep -o .); do echo "== $l"; grep -E "^\| |eval:|goals|sweep:|\[table\]" outputs/logs/$l.log | tail -14; done
