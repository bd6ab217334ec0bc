"""Training of the embedded zoo's neural models: deterministic, on CPU, with a progress bar."""
