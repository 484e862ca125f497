"""Models: the keyframe MM-DiT (mmdit.py) with GoldenMem memory (goldenmem.py) and the diffusion-forcing
video DiT (video_dit.py)."""
