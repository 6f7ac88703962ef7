#!/usr/bin/env bash
# Sets up a fresh machine (see scripts/setup.sh) and runs the test suite. Extra arguments go to pytest,
# e.g. scripts/test.sh -m "not slow" for the quick unit tests only.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
python -m pytest -q -p no:cacheprovider "$@"
