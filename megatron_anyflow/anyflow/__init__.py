"""AnyFlow algorithm pieces: time schedule, objectives, samplers and the Gaussian ground truth.

- :mod:`.timesteps`: time shift, stage-1 (t, r) sampler, loss weight w(t), logit-normal t, inference grid.
- :mod:`.objective`: stage-1 forward flow-map loss (paper Alg. 1, eq. 3-7) and the teacher's
  flow-matching loss.
- :mod:`.sampler`: the any-step flow-map Euler sampler and the teacher's CFG Euler sampler.
- :mod:`.gaussian`: closed-form flow map / velocity for Gaussian data (ground truth for tests).
"""
from .gaussian import GaussianData
from .objective import FlowMapObjectiveConfig, TeacherObjectiveConfig, flow_matching_loss, stage1_loss
from .sampler import FlowMapEulerSampler, TeacherEulerSampler
from .timesteps import (
    KIND_BOUNDARY,
    KIND_FREE,
    KIND_R_ZERO,
    NUM_TRAIN_TIMESTEPS,
    TimeSamplerConfig,
    flow_map_time_grid,
    logit_normal_t,
    loss_weight,
    loss_weight_grid,
    sample_t_r,
    shift_time,
    split_counts,
    to_model_scale,
)

__all__ = [
    # timesteps
    "NUM_TRAIN_TIMESTEPS", "KIND_BOUNDARY", "KIND_R_ZERO", "KIND_FREE", "shift_time", "TimeSamplerConfig",
    "split_counts", "sample_t_r", "loss_weight_grid", "loss_weight", "logit_normal_t", "flow_map_time_grid",
    "to_model_scale",
    # objective
    "FlowMapObjectiveConfig", "TeacherObjectiveConfig", "stage1_loss", "flow_matching_loss",
    # sampler
    "FlowMapEulerSampler", "TeacherEulerSampler",
    # gaussian
    "GaussianData",
]
