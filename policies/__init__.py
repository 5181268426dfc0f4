"""Policy networks, RL trainers and Ray rollout workers."""
