"""Training-side tools: a procedural world of coloured shapes (`training.synthetic`) and the shards
written from it (`training.shards`), read by the pipeline exactly like user data."""
