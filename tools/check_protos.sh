#!/bin/sh
# The proto contract checks of `make lint-protos` (part of `make test`), run from the repository root:
#   1. buf lint on protos/ (rules and their reasoned exceptions in protos/buf.yaml);
#   2. buf breaking: protos/ as it is now against protos/ of the previous commit (HEAD~1),
#      so a commit that renumbers, renames, retypes or removes anything published fails.
# A repository with a single commit (or a shallow clone) has nothing to compare with:
# step 2 is skipped and says so.
# Usage: tools/check_protos.sh PATH_TO_BUF
set -eu
buf=${1:?usage: tools/check_protos.sh PATH_TO_BUF}

"$buf" lint protos
echo "buf lint: protos/ is clean"

if ! git rev-parse --verify --quiet 'HEAD~1^{commit}' >/dev/null; then
    echo "buf breaking: skipped: no previous commit to compare with (first commit or shallow clone)"
    exit 0
fi
if ! git cat-file -e 'HEAD~1:protos' 2>/dev/null; then
    echo "buf breaking: skipped: the previous commit has no protos/"
    exit 0
fi
"$buf" breaking protos --against '.git#ref=HEAD~1,subdir=protos'
echo "buf breaking: protos/ is compatible with $(git rev-parse --short 'HEAD~1')"
