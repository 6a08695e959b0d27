#!/bin/sh
# Sleeps far past any short --test_timeout. The e2e test passes a per-run
# length in STOKER_E2E_SLEEP so it can look for a leftover process afterwards.
sleep "${STOKER_E2E_SLEEP:-47}"
