#!/usr/bin/env bash
# Container fault tests (tests/tests/t70_containers.rs), run by .ci/run when time
# allows: builds the static binary and the herald:latest image, then runs the test,
# which brings the 3-node compose cluster up fresh (up.sh), and under a steady
# publisher with a subscriber on every node (the delivery checker) kills the node
# leading the checked group (docker kill) and starts it again, cuts that leader off
# the network for 10 s (docker network disconnect), and restarts all three nodes one
# at a time through SIGTERM (docker compose stop). After each fault every acked
# message must be stored and delivered exactly once, in order, to every subscriber.
# It prints the longest publish unavailability of each fault (and a JSON line) and
# tears the cluster down, volumes included, pass or fail.
#
# Needs Docker, Compose (docker compose or docker-compose), curl and the Rust
# toolchain. Replaces any compose cluster of deploy/compose that is running.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

"$root/deploy/docker/build.sh"
cd "$root"
HERALD_CONTAINER_TESTS=1 cargo test --locked -p herald-tests --test t70_containers -- --nocapture --test-threads=1
