"""A deterministic synthetic dataset in the exact FathomNet 2025 competition format.

Why: the pipeline must be demoable and testable on 2 CPU cores in minutes, without the real
data. Organisms are drawn so that their look follows their lineage, so a small CNN learns the
task and its mistakes tend to be taxonomically close, which the competition's metric rewards.
The test split is shifted like the real one: smaller boxes, dimmer and bluer frames.

A tool beside the pipeline, not a stage of it. Its modules, from the category to the files:

- looks.py: a category's appearance (body plan, colours, pattern, proportions) from its lineage;
- plans.py: the pen and one drawing function per body plan;
- sprites.py: one organism instance (plan, pattern, marks, flip, rotation) as an RGBA sprite;
- frames.py: an ROV frame (background, organisms placed, noise, marine snow) and its boxes;
- dataset.py: boxes dealt into frames, frames rendered and saved, the COCO JSONs, solution.csv;
- __main__.py: the command line (`python -m lib.demo`), regenerating only when something changed.
"""
