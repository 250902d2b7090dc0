"""Running a study: the study file and its search space, the Ray Tune runner, the trainable,
each trial's resources and timing, the plan, and the pretrained weights a run needs."""
