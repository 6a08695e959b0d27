#!/bin/sh
# Writes the lines of $1 to $2 in reverse order.
set -eu
tac "$1" > "$2"
