#!/usr/bin/env bash
# Sets up everything Sprout needs on a Debian machine: system packages, then the virtualenv.
# Idempotent: a second run installs nothing new. Usage: scripts/setup.sh [VENV_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv}

# System packages from Debian: the broker the tests and the demo start, and the demo's dataset.
need=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || need+=(dataset-fashion-mnist)
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || need+=(python3-venv)
# tflite-support's compiled modules (the metadata writer every export uses) link libusb-1.0; nothing calls it.
dpkg-query -W -f='${Status}' libusb-1.0-0 2>/dev/null | grep -q 'ok installed' || need+=(libusb-1.0-0)
. scripts/debian.sh
install_debian_packages setup ${need[@]+"${need[@]}"}

# pip, quiet. A machine whose pip configuration names extra local indexes (extra-index-url=file:///...)
# warns once per package about each index that lacks it: harmless, and a page of noise on first set-up.
pip_install() {
    local pip=$1
    shift
    "$pip" install -q --disable-pip-version-check "$@" \
        2> >(grep -v -- "is ignored: it is neither a file nor a directory" >&2 || true)
}

# The project and its pinned dependencies (torch==2.13.0) in one virtualenv.
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
echo "setup: installing Sprout into $venv"
# Two distributions from this checkout, in one resolution: sprout-edge (edge/) and sprout, which needs it.
pip_install "$venv/bin/pip" -e './edge' -e '.[test]'
# The TFLite Model Metadata writer of every export (daemon/export/metadata.py): tflite-support's metadata
# modules, which need only flatbuffers (ai-edge-litert brings it). --no-deps because it declares protobuf<4,
# which would replace the protobuf ai-edge-litert needs; its Task Library, which would need it, is not used here.
pip_install "$venv/bin/pip" --no-deps 'tflite-support==0.4.4'
"$venv/bin/python" -c 'import tensorflow_lite_support.metadata.python.metadata_writers.metadata_writer'
# The second target interpreter, tflite-runtime 2.14 (still on many older devices), imports only
# with numpy<2, which litert-torch's numpy 2 rules out: its own small virtualenv beside the main one.
# The exporter runs edge/probe.py in it as a subprocess (export.tflite_runtime_python).
tflite_venv="${venv%/}-tflite"
[ -x "$tflite_venv/bin/python" ] || python3 -m venv "$tflite_venv"
pip_install "$tflite_venv/bin/pip" 'tflite-runtime==2.14.0' 'numpy==1.26.4'
# The device side (edge/pyproject.toml, distribution sprout-edge) into that same virtualenv: there
# `sprout-edge` runs on tflite-runtime without torch, as on an older device, and the tests call it.
# Editable, so it runs the working tree's edge/ and nothing of daemon/ (its finder maps only `edge`).
pip_install "$tflite_venv/bin/pip" -e './edge[tflite]'
if "$tflite_venv/bin/python" -c 'import torch' >/dev/null 2>&1; then
    echo "setup: torch is importable in $tflite_venv, which must stay a device-like environment" >&2
    exit 1
fi
"$venv/bin/sprout" --version
"$tflite_venv/bin/sprout-edge" --version
