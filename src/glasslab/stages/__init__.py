"""Stage scripts: each wires data, model and an objective into the one training loop.

Every stage has the signature `stage(cfg, run, *, init=None, hooks=(), progress=None)`, where `init` is a
checkpoint directory whose weights start the stage (None: the run's own previous stage, or scratch).
"""
