"""Preference data: format, readers/writers, task sampling and simulated populations."""

from steerable.data.readers import load_preferences
from steerable.data.sampler import TaskBatch, TaskSampler
from steerable.data.schema import PreferenceData
from steerable.data.simulate import (
    Population,
    attribute_population,
    gaussian_population,
    simulate,
    step_population,
)
from steerable.data.writers import write_preferences

__all__ = [
    "Population",
    "PreferenceData",
    "TaskBatch",
    "TaskSampler",
    "attribute_population",
    "gaussian_population",
    "load_preferences",
    "simulate",
    "step_population",
    "write_preferences",
]
