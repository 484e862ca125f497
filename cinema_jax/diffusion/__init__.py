"""Diffusion objectives and samplers: rectified flow (flow.py), diffusion forcing (forcing.py), samplers
(samplers.py)."""
