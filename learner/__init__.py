"""The learner service (`robot-rl learner`, design §4-§6): phases, durable transition store, weights broadcast.

`LearnerService` runs one learner; `run_learner` is the command's entry point (signal handling, exit code).
"""

from .service import LearnerError, LearnerService, run_learner

__all__ = ["LearnerError", "LearnerService", "run_learner"]
