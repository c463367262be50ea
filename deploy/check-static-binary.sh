#!/usr/bin/env bash
# Builds the release binary with the Swift standard library and Foundation linked in
# (--static-swift-stdlib, as the Dockerfile does) and checks that it needs no Swift runtime library:
# ldd lists none, and it runs with an empty environment.
set -euo pipefail
cd "$(dirname "$0")/.."
swift build -c release --product chatbridge --static-swift-stdlib
binary="$(swift build -c release --show-bin-path)/chatbridge"
echo "ldd $binary:"
ldd "$binary"
if ldd "$binary" | grep -Ei 'libswift|libFoundation|libdispatch|libBlocksRuntime|libicu'; then
    echo "the binary links Swift runtime libraries" >&2
    exit 1
fi
env -i PATH=/usr/bin:/bin "$binary" --help >/dev/null
env -i PATH=/usr/bin:/bin CHATBRIDGE_DATABASE_URL=sqlite::memory: "$binary" check >/dev/null || true
echo "ok: $(du -h "$binary" | cut -f1) static binary; no Swift runtime library linked"
