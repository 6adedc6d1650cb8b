#!/usr/bin/env bash
# The paper's full table: 5 tasks x 2 students, then one report across the 10 runs.
# Needs the teacher served as in paper_tinyllama_medqa.yaml. InternLM2.5-1.8B ships custom modelling code, so
# its runs opt in to trust_remote_code explicitly (orpo-distill never turns it on by itself).
set -euo pipefail
cfg=examples/paper_tinyllama_medqa.yaml
# Train (and validation) questions come from each built-in task's hub default (train split); test from ../shared/data.
declare -A TEST=([medqa]=../shared/data/medqa/test.jsonl [arc_challenge]=../shared/data/arc_challenge/test.jsonl
                 [strategyqa]=ChilleD/StrategyQA [openbookqa]=../shared/data/openbookqa/test.jsonl
                 [gsm8k]=../shared/data/gsm8k/test.jsonl)
runs=()
for student in TinyLlama/TinyLlama-1.1B-Chat-v1.0 internlm/internlm2_5-1_8b-chat; do
  extra=(); [[ $student == internlm/* ]] && extra=(student.trust_remote_code=true)
  for task in medqa arc_challenge strategyqa openbookqa gsm8k; do
    out=runs/paper/${student##*/}/$task
    orpo-distill run "$cfg" --out "$out" task.name=$task task.train.path=null task.validation.path=null \
      task.test.path=${TEST[$task]} student.model=$student "${extra[@]}"
    runs+=("$out")
  done
done
orpo-distill report "${runs[@]}" --out runs/paper/report
