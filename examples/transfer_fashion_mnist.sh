#!/bin/sh
# The transfer experiment by hand, one run of each kind (`bigtransfer demo` runs all of them; then
# `python docs/make_results.py runs/demo docs/RESULTS.md` writes the page). Needs `apt-get install dataset-fashion-mnist`. Run from the repository root.
set -e
# 1. Upstream: pre-train tiny BiT on the 30,000 training images of classes 0-4 (paper recipe, batch 128).
bigtransfer pretrain --model tiny --data fashion-mnist --classes 0-4 --output runs/upstream \
    --batch-size 128 --epochs 16 --resize 36 --crop 32
# 2. Transfer to 5 examples of each unseen class 5-9; evaluated on the 5,000 test images of those classes.
bigtransfer finetune --model runs/upstream/model --data fashion-mnist --classes 5-9 --shots 5 --seed 0 \
    --output runs/transfer-5shot --max-steps 100 --batch-size 64 --base-lr 0.01 --resize 36 --crop 32
# 3. The same from random initialisation.
bigtransfer finetune --model tiny --data fashion-mnist --classes 5-9 --shots 5 --seed 0 \
    --output runs/random-5shot --max-steps 100 --batch-size 64 --base-lr 0.01 --resize 36 --crop 32
# 4. Evaluate, classify two test images, export features for a linear probe.
bigtransfer evaluate --model runs/transfer-5shot/model --data fashion-mnist --classes 5-9
bigtransfer features --model runs/upstream/model --data fashion-mnist --classes 5-9 --output runs/features.npy
