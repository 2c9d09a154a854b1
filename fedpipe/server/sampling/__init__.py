"""Client samplers: which connected clients train in each round (``[server] sampler``)."""

from fedpipe.server.sampling.base import Candidate, ClientSampler
from fedpipe.server.sampling.poisson import PoissonSampler
from fedpipe.server.sampling.power_of_choice import PowerOfChoiceSampler
from fedpipe.server.sampling.uniform import UniformSampler
from fedpipe.server.sampling.weighted import WeightedSampler

__all__ = [
    "Candidate",
    "ClientSampler",
    "PoissonSampler",
    "PowerOfChoiceSampler",
    "UniformSampler",
    "WeightedSampler",
]
