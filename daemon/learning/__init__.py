"""The online learner and its thread: backbone and growing head, replay, input pipeline, checkpoints."""
