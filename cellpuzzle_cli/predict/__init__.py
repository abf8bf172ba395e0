"""`cellpuzzle predict`: model answers for test puzzles, one resumable JSONL file per shard.

`run` is the step's service (defaults resolved, one shard here or all of them on Ray),
`shard_run` answers one shard and resumes its file, `settings` holds the generation knobs,
`shards` the shard spec and file names, `records` the puzzle readers and the shard writer, and
one module per backend (`hf_backend`, `vllm_backend`, `celltypist_backend`; the baseline is
`cellpuzzle_cli.baseline`).
"""
