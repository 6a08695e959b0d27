#!/bin/sh
# Prints its input files upper-cased.
set -eu
cat "$@" | tr 'a-z' 'A-Z'
