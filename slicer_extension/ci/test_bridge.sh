#!/usr/bin/env bash
# Optional CI step: the Slicer module's bridge against Slicer's real MRML classes (slicer-core).
#
# slicer-core (Slicer's MRML and module logics without Qt, from PyPI) pins vtk==9.6.2, which
# clashes with medsam3d's own VTK, so it gets its own virtual environment (about 1 GB;
# Python 3.11: slicer-core ships cp311 wheels). The two tests that exchange files with medsam3d
# run medsam3d in its environment, $MEDSAM3D_PYTHON (default: the repository's .venv).
#
#   slicer_extension/ci/test_bridge.sh            # creates .venv-slicer once, then runs the tests
#   SLICER_VENV=/tmp/venv-slicer slicer_extension/ci/test_bridge.sh -x -q
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV="${SLICER_VENV:-.venv-slicer}"
PYTHON="${PYTHON311:-python3.11}"
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q "slicer-core==5.13.31053.0" numpy pytest
fi
export MEDSAM3D_PYTHON="${MEDSAM3D_PYTHON:-$PWD/.venv/bin/python}"
exec "$VENV/bin/python" -m pytest tests/test_slicer_bridge.py -p no:cacheprovider "$@"
