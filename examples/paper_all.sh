#!/usr/bin/env bash
# The paper's full table: 5 tasks x 2 students, then one report across the 10 runs.
# Needs the teacher served as in paper_tinyllama_medqa.yaml. InternLM2.5-1.8B ships custom modelling code, so
# its runs opt in to trust_remote_code explicitly (orpo-distill never turns it on by itself).
#
# Data: every task reads its built-in hub dataset (train split for training, test split for evaluation):
#   medqa GBaker/MedQA-USMLE-4-options, arc_challenge allenai/ai2_arc (ARC-Challenge), strategyqa ChilleD/StrategyQA,
#   openbookqa allenai/openbookqa (main), gsm8k openai/gsm8k (main).
# To evaluate on local copies instead, set TEST_DIR to a folder holding TASK/test.jsonl for each task (the hub's
# field names), e.g.  TEST_DIR=data bash examples/paper_all.sh
set -euo pipefail
cfg=examples/paper_tinyllama_medqa.yaml
runs=()
for student in TinyLlama/TinyLlama-1.1B-Chat-v1.0 internlm/internlm2_5-1_8b-chat; do
  extra=(); [[ $student == internlm/* ]] && extra=(student.trust_remote_code=true)
  for task in medqa arc_challenge strategyqa openbookqa gsm8k; do
    data=(); [[ -n ${TEST_DIR:-} ]] && data=("task.test.path=$TEST_DIR/$task/test.jsonl")
    out=runs/paper/${student##*/}/$task
    orpo-distill run "$cfg" --out "$out" task.name=$task student.model=$student "${extra[@]}" "${data[@]}"
    runs+=("$out")
  done
done
orpo-distill report "${runs[@]}" --out runs/paper/report
