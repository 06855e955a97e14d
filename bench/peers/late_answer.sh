#!/bin/sh
# The half-close probe's child: it answers 1 s after its stdin ends.
cat >/dev/null
sleep 1
echo answer
