"""`cellpuzzle score`: metrics over prediction files, one report per run.

One metric family per module: `runs` (which files form a run, reading them), `judging` (every
prediction against its gold answer), `cello1` (Cell-o1's summary metrics), `chance`,
`per_type` (precision/recall/F1, confusion matrix), `hierarchy` (Cell Ontology), `plot` and
`html` (the one-page report).
`report` composes them into a report per run; `run` is the step's service.
"""
