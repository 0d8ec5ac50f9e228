#!/bin/sh
# A deploy script with a HIDDEN circular dependency: the script itself only
# talks to the internal mirror, but the helper tool it runs checks
# api.github.com for updates in the background.
set -eu
tools=$(cd "$(dirname "$0")/../tools" && pwd)
echo "hidden.sh: running the deploy helper"
python3 "$tools/deploy-helper" --artifact http://mirror.internal/tool.tgz
echo "hidden.sh: deployed"
