#!/bin/sh
# Fails when src/gen differs from what `buf generate` makes from protos/ now
# (the TypeScript twin of `tools/protogen.py --check`). Run through npm, so
# node_modules/.bin (buf, protoc-gen-es) is on PATH.
set -eu
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
buf generate --output "$out"
if ! diff -r "$out/src/gen" src/gen >/dev/null; then
    echo "clients/typescript/src/gen is stale; run \`npm run generate\` in clients/typescript:" >&2
    diff -rq "$out/src/gen" src/gen >&2 || true
    exit 1
fi
echo "generated TypeScript is up to date"
