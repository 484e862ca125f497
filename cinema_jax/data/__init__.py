"""Film data: synthetic films (synthetic.py), ingest with OpenCV + PySceneDetect (ingest.py), captioners
(captions.py), LongVie control maps (control.py), ArrayRecord + zarr shards (shards.py), grain loaders (loader.py),
caption tokenizers (text.py) and the ``synth`` / ``ingest`` commands (cli.py). See docs/data.md.

Submodules are imported on use (only loader.py imports jax).
"""
