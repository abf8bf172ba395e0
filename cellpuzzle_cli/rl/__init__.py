"""`cellpuzzle rl grpo|ppo`: verl on Ray for clusters, TRL on one machine.

`run` is the step's service, `settings` reads verl's dotted keys plus our `cellpuzzle:`
section, `verl_backend`/`trl_backend` drive the two engines, `preflight` checks a verl job
before Ray starts, `cpu_mode`/`verl_cpu`/`hf_rollout` run verl's real trainer on a CPU, and
`health` watches the reward.
"""
