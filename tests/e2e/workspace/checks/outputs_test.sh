#!/bin/sh
# Checks generated files and runs the cc_binary from the test's runfiles.
set -eu
grep -q '^quince$' gen/joined.txt
grep -q '^6$' gen/joined.txt
./cc/hello | grep -q '^hello from cc_binary: stoker e2e '
./gen/script.sh | grep -q '^generated script ran$'
echo "outputs_test: all checks passed"
