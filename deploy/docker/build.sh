#!/usr/bin/env bash
# Builds a statically linked `herald` and the FROM-scratch image around it, tagged
# herald:<version of broker/Cargo.toml> and herald:latest. Safe to re-run: cargo and
# docker only redo what changed.
#
#   deploy/docker/build.sh            # env: CARGO (default cargo), DOCKER (default docker)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cargo="${CARGO:-cargo}"
docker="${DOCKER:-docker}"
target=x86_64-unknown-linux-gnu
# A separate target dir: +crt-static changes RUSTFLAGS, which would otherwise force
# a rebuild of everything in the shared target/.
target_dir="$root/target/static"
bin="$target_dir/$target/release/herald"

cd "$root"
pkgid="$("$cargo" pkgid -p herald-broker)"     # e.g. path+file:///…/broker#herald-broker@0.1.0
version="${pkgid##*[#@]}"
[[ "$version" =~ ^[0-9]+\.[0-9]+\.[0-9]+ ]] || { echo "build.sh: cannot read the version from '$pkgid'" >&2; exit 1; }

echo "==> cargo build --release --bin herald (static, $target) into ${target_dir#$root/}"
RUSTFLAGS='-C target-feature=+crt-static' "$cargo" build --release \
    --bin herald --target "$target" --target-dir "$target_dir"

# A static binary has no interpreter (PT_INTERP); refuse to ship one that has.
if command -v file >/dev/null; then
    desc="$(file -L "$bin")"
    echo "==> $desc"
    case "$desc" in
        *"static"*) ;;
        *) echo "build.sh: $bin is not statically linked" >&2; exit 1 ;;
    esac
fi

context="$(mktemp -d)"
trap 'rm -rf "$context"' EXIT
# Debug info is most of the file (≈84 MB → ≈15 MB); symbols stay for backtraces.
if command -v strip >/dev/null; then
    strip --strip-debug -o "$context/herald" "$bin"
else
    cp "$bin" "$context/herald"
fi
cp "$here/nsswitch.conf" "$context/"
mkdir "$context/data"

echo "==> docker build -t herald:$version -t herald:latest"
"$docker" build --quiet -f "$here/Dockerfile" --build-arg "VERSION=$version" \
    -t "herald:$version" -t herald:latest "$context"
"$docker" image ls herald --format '    {{.Repository}}:{{.Tag}}  {{.ID}}  {{.Size}}'
echo "==> built herald:$version and herald:latest from ${bin#$root/}"
