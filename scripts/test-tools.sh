#!/usr/bin/env bash
# What only the test suite needs (a service host does not): `make test` runs this after set-up.
# Idempotent: installs nothing when everything is there. Usage: scripts/test-tools.sh [VENV_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv}
need=()
# Headless Chromium renders the status page in tests/test_status.py, as an operator's browser would.
command -v chromium >/dev/null 2>&1 || need+=(chromium)
# strace plays the unit's system-call filter around the real daemon in tests/test_systemd.py.
command -v strace >/dev/null 2>&1 || need+=(strace)
# systemd-analyze verifies the unit and scores its sandbox in tests/test_systemd.py (no running systemd needed).
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
# mosquitto_pub sends the README's example messages in tests/test_readme.py, as a feed in any language would.
command -v mosquitto_pub >/dev/null 2>&1 || need+=(mosquitto-clients)
# PostgreSQL's server binaries: the tests start a private server (daemon/tools/postgres.py) to run the store's tests
# against its PostgreSQL backend too. The machine's own server, if any, is neither needed nor touched.
command -v initdb >/dev/null 2>&1 || compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || need+=(postgresql)
# zstd applies the registry's delta downloads in tests/test_deltas.py, as the C library an iOS app links does.
command -v zstd >/dev/null 2>&1 || need+=(zstd)
# The platform classifiers below: MediaPipe's library links EGL and GLES (it runs on the CPU here), the
# Task Library's links libusb-1.0.
for package in libegl1 libgles2 libusb-1.0-0; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'ok installed' || need+=("$package")
done
. scripts/debian.sh
install_debian_packages test-tools ${need[@]+"${need[@]}"}

# The platform image classifiers apps use, which read a model's TFLite Model Metadata to name its classes
# (tests/test_model_metadata.py runs tests/platform_classifiers.py here): MediaPipe's ImageClassifier and
# tflite-support's Task Library. A virtualenv of their own: the Task Library needs protobuf<4, the daemon's
# ai-edge-litert a newer one. mediapipe without its dependencies because it names opencv-contrib-python, the
# GUI build that needs libGL; the headless build gives the same cv2 module, which, like matplotlib, mediapipe
# imports for its drawing utilities. About 700 MB, under a minute from PyPI.
tasks_venv="${venv%/}-tasks"
tasks_pins="tflite-support==0.4.4 protobuf==3.20.3 numpy==2.4.6 absl-py==2.5.1 flatbuffers==25.12.19 sounddevice==0.5.6"
tasks_pins+=" certifi opencv-contrib-python-headless==5.1.0.95 matplotlib==3.11.2"
tasks_no_deps="mediapipe==1.2.2"
if [ "$(cat "$tasks_venv/.installed" 2>/dev/null)" != "$tasks_pins $tasks_no_deps" ]; then
    echo "test-tools: installing MediaPipe and the TFLite Task Library into $tasks_venv"
    [ -x "$tasks_venv/bin/python" ] || python3 -m venv "$tasks_venv"
    # Quiet; a pip configuration naming extra local indexes warns about each once per package: noise.
    pip_install() { "$tasks_venv/bin/pip" install -q --disable-pip-version-check "$@" \
        2> >(grep -v -- "is ignored: it is neither a file nor a directory" >&2 || true); }
    # shellcheck disable=SC2086 # each pin is a word
    pip_install $tasks_pins
    # shellcheck disable=SC2086
    pip_install --no-deps $tasks_no_deps
    "$tasks_venv/bin/python" -c 'import mediapipe.tasks.python.vision, tflite_support.task.vision'
    echo "$tasks_pins $tasks_no_deps" >"$tasks_venv/.installed"
fi
