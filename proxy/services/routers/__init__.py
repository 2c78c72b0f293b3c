"""The learned router: features of a prompt, the estimators, fitting from labelled prompts (with the
decision threshold chosen on held-out folds) and the runtime service the `route` action asks."""
