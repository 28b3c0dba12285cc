#!/usr/bin/env bash
# Applies kv-policy.patch to mistralrs-core 0.8.1 and mistralrs 0.8.1 (their crates.io sources,
# copied into a scratch directory), builds them, and runs check/main.rs: mistral.rs's own
# scheduler with the identity and a sharing policy, checked against layerkv-mistralrs.
# Run once by hand (it builds mistral.rs in release mode: ~20 min on 2 cores); not part of CI.
#
#   adapters/mistralrs/upstream/run.sh [SCRATCH_DIR] [-- MODEL_DIR]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../../.." && pwd)"
scratch="${1:-$(mktemp -d /tmp/layerkv-upstream.XXXXXX)}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/layerkv-target}"

# The crates' published sources, as cargo downloaded them for the adapter's dev-dependencies.
(cd "$repo" && cargo fetch --quiet)
registry="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/mistralrs-core-0.8.1 | head -1)"
registry="$(dirname "$registry")"
rm -rf "$scratch/mistralrs-core" "$scratch/mistralrs" "$scratch/check"
mkdir -p "$scratch/check/src"
cp -r "$registry/mistralrs-core-0.8.1" "$scratch/mistralrs-core"
cp -r "$registry/mistralrs-0.8.1" "$scratch/mistralrs"
patch -s -d "$scratch" -p1 < "$here/kv-policy.patch"
echo "patched mistralrs-core and mistralrs 0.8.1 in $scratch"

cp "$here/check/main.rs" "$scratch/check/src/main.rs"
cp "$here/../tests/common/mistralrs_request.rs" "$scratch/check/src/mistralrs_request.rs"
cp "$repo/Cargo.lock" "$scratch/check/Cargo.lock"
cat > "$scratch/check/Cargo.toml" <<TOML
[package]
name = "kv-policy-check"
version = "0.1.0"
edition = "2021"
publish = false

[dependencies]
layerkv = { path = "$repo/crates/layerkv" }
layerkv-model = { path = "$repo/crates/layerkv-model" }
layerkv-mistralrs = { path = "$repo/adapters/mistralrs" }
candle-core = "=0.10.2"
mistralrs = "=0.8.1"
tokio = { version = "1", features = ["rt-multi-thread", "macros"] }

[patch.crates-io]
mistralrs-core = { path = "../mistralrs-core" }
mistralrs = { path = "../mistralrs" }

[workspace]

[profile.release]
debug = 1
TOML
shift || true
[ "${1:-}" = "--" ] && shift
cargo run --release --manifest-path "$scratch/check/Cargo.toml" -- "$@"
