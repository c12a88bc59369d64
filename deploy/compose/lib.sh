# Shared by up.sh and down.sh (sourced, not run).
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
project="${COMPOSE_PROJECT_NAME:-herald}"
# The compose plugin (`docker compose`) if present, else the standalone docker-compose.
if docker compose version >/dev/null 2>&1; then
    compose=(docker compose)
elif command -v docker-compose >/dev/null; then
    compose=(docker-compose)
else
    echo "neither 'docker compose' nor 'docker-compose' is installed" >&2
    exit 1
fi
compose+=(-p "$project" -f "$here/compose.yaml")
