# Sourced by the scripts: make .venv with Python 3.11+ and install taskscheduler into it.
# A regular (non-editable) install, so that twistd finds the plugins in twisted/plugins/.
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "taskscheduler needs Python 3.11 or newer; set PYTHON=/path/to/python3.11" >&2
    exit 1
fi
VENV=${VENV:-$PWD/.venv}
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --upgrade pip
fi
"$VENV/bin/pip" install --quiet --disable-pip-version-check ".[test]"
# Same version number, new code: make sure the tree's current code is what is installed.
"$VENV/bin/pip" install --quiet --disable-pip-version-check --no-deps --force-reinstall .
