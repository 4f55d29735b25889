"""Stage scripts: each wires data, model and an objective into the one training loop."""
