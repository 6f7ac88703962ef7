#!/usr/bin/env bash
# Sets up a fresh machine (see scripts/setup.sh) and runs the offline end-to-end demo:
# a synthetic speech corpus, a small CTC policy, a learned reward model, RL on a held-out voice.
# Extra arguments go to `rlnf demo` (e.g. --output DIR, --fresh).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
rlnf demo "$@"
