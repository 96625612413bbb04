"""One module per pipeline stage; each exposes `run_<stage>(ctx)` (see conceptdistill.runner)."""
