"""What the tests share: the backends under test (backends.py), tensor comparisons (compare.py),
multi-step trajectories (trajectory.py), the parity rule (parity.py), the CUDA backend's CPU
emulation (cuda_sim.py) and shared scenarios (scenarios.py). Test modules import from here, never
from each other or from conftest."""
