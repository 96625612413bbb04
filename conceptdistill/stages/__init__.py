"""One module per pipeline stage, each holding only its run function, declared with `@register_stage`
(pipeline/registry.py). Stages never import each other: they meet in the run folder (pipeline/layout.py)."""
