"""What trains and how: strategies (a registry), the plan of phases and optimizer groups,
learning-rate schedules, per-phase data (images or cached features), the epoch loop and
its callbacks, and `session`, which sets a run up and carries it out."""
