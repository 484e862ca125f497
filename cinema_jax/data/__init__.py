"""Film data: synthetic films (synthetic.py), ingest (ingest.py), control maps (control.py), shards
(shards.py), loaders (loader.py)."""
