"""Reading and decoding media files: the one way images, videos and shards become items and pixels.

The annotation pipeline (`pipeline/`) runs these functions inside Ray tasks, and training (`training/`)
calls them directly, so a model is trained on exactly the pixels it will annotate. Nothing here imports
Ray; both of them import this package, never the other way round.

  formats.py   which file extensions are images or videos
  storage.py   fsspec filesystems and URIs (local paths, s3://, ...), S3 settings from the environment
  files.py     listing an input and reading each file's items (plain files, WebDataset tars, Parquet)
  decode.py    an item's bytes -> model-ready pixels (PIL, decord, open_clip's eval transform)
"""
