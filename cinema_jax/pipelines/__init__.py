"""Generation pipelines: long videos by diffusion-forcing rollout (long_video.py), and later story -> movie."""
