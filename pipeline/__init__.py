"""xlpipe stages: prepare, train, evaluate, export, generate (each ``python -m pipeline.<stage>``)."""
