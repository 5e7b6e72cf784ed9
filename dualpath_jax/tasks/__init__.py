"""Tasks that give model outputs a meaning: synthetic prompts, trained checkpoints that solve them.

  recall.py   long-range associative recall: prompts, training streams and multi-turn agent
              trajectories whose answers lie far back in the context (numpy only)
  trained.py  the trained recall checkpoints in checkpoints/ (`load_trained`) and greedy answers
              through the model's prefill path, with or without a cached (or corrupted) prefix
"""
