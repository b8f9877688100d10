#!/usr/bin/env bash
# Every GPU figure the issues ask for, in one device call on a lent 4-GPU H200 machine (repo
# root, stripped binaries and the test binary in .device/):
#   bash benchmarks/all.sh
# 1. one GPU (h200.sh): the GPU tests, the seed preset, the default path for each strategy at
#    4,096 records (steady and end-to-end), packed 32k micro-batches, telemetry on/off, and a
#    real out-of-memory;
# 2. several GPUs (multigpu.sh): equivalence, scaling at 64 and 256 records per step, failures.
# Results: $OUT/single/ and $OUT/multi/ (a tarball and a table each).
set -uo pipefail
out=${OUT:-/tmp/out}
B="--weights random --dataset synthetic"
OUT=$out/single bash benchmarks/h200.sh \
  seed "--preset seed $B" \
  lastn "$B --samples 4096" \
  full "$B --samples 4096 --strategy full" \
  lora "$B --samples 4096 --strategy lora" \
  lastn_packed32k "$B --samples 4096 --batch-plan packed --max-tokens-per-micro-batch 32768" \
  telemetry_on "$B --samples 2048" \
  telemetry_off "$B --samples 2048 --telemetry-interval-ms 0" \
  oom "$B --samples 256 --strategy full --batch-plan padded --max-seq-len 2048 --pad-to 2048 --micro-batch-size 32 --grad-accum 2 --max-steps 3"
OUT=$out/multi bash benchmarks/multigpu.sh
# Only a few files come back from the device: the logs are inside the tarballs.
rm -f "$out"/single/{log.txt,machine.txt} "$out"/multi/{log.txt,machine.txt}
cat "$out/single/table.txt"
