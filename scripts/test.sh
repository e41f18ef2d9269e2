#!/usr/bin/env bash
# Lint, type-check, check the agent's Python floor, run the tests.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Console scripts of the python3 that runs the tests (pip may put them off PATH).
PATH="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$PATH"
export PATH

# Modules shipped to the remote agent: they must run on Python 3.8. Annotations are not
# evaluated there (`from __future__ import annotations`), except the wire messages, which
# use typing generics and are exercised under 3.8 by tests/e2e.
AGENT_MODULES="syncd/protocol syncd/agent syncd/fsops.py syncd/scan.py syncd/rules.py syncd/tarstream.py syncd/tarformat.py"

existing() {
    local p
    for p in "$@"; do
        if [ -e "$p" ]; then
            printf '%s\n' "$p"
        else
            echo "test.sh: skipping missing path $p" >&2
        fi
    done
}

echo "--- ruff"
mapfile -t lint_paths < <(existing syncd tests bench)
ruff check "${lint_paths[@]}"

echo "--- mypy"
mypy

echo "--- vermin (agent modules, Python 3.8+)"
# shellcheck disable=SC2086  # word splitting of the module list is intended
mapfile -t agent_paths < <(existing $AGENT_MODULES)
if [ "${#agent_paths[@]}" -gt 0 ]; then
    vermin -t=3.8- --no-tips --violations "${agent_paths[@]}"
fi

echo "--- pytest"
python3 -m pytest -q -p no:cacheprovider tests
