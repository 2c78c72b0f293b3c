"""Plain objects built once per runtime and shared by steps: key ring, estimator, budget ledger, ..."""
