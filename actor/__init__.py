"""The actor service: Q-gating next to the robot at a fixed rate, every episode on disk, transitions to the learner."""
