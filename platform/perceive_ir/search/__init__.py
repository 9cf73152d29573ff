"""Ray Tune searches over the stage-2 config (loss weights, L_dpl's tiers, any dotted key): trials are
stage-2 Ray Train + DeepSpeed runs, tracked as one MLflow parent run with nested trials."""

from perceive_ir.search.config import MetricConfig, SchedulerConfig, SearchAlgorithmConfig, SearchConfig, plan_search
from perceive_ir.search.space import DISTRIBUTIONS, Distribution, parse_space

__all__ = ["SearchConfig", "MetricConfig", "SchedulerConfig", "SearchAlgorithmConfig", "plan_search", "Distribution",
           "parse_space", "DISTRIBUTIONS"]
