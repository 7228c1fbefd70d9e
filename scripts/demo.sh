#!/usr/bin/env bash
# The main job: a short demo of gcl-ops. Extra arguments go to scripts/demo.py.
source "$(dirname "$0")/env.sh"
exec python scripts/demo.py "$@"
