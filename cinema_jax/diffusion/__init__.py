"""Diffusion objectives and samplers: rectified flow (flow.py), Euler/CFG (samplers.py), diffusion forcing
(forcing.py), per-frame flow UniPC / Euler (unipc.py)."""
