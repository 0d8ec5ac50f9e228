#!/bin/sh
# A deploy script with a TRANSIENT circular dependency: the script only calls
# the internal migrations service (examples/tools/migrations-service), and
# that service downloads the migrations from github.com. Nothing in this
# script, nor any tool it runs, names GitHub.
set -eu
migrations="${MIGRATIONS_URL:-http://127.0.0.1:8080}"
echo "transient.sh: running the migrations through $migrations"
curl -fsS -X POST "$migrations/migrate"
echo "transient.sh: deployed"
