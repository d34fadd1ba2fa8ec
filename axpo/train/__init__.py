"""Training: the DeepSpeed trainer and one module per job.

build (task, policy, engine, sampling, the method's AxpoConfig) · sft (the warm-start stage) ·
rl (the RL stage) · run (`axpo train`: both stages, resume, summary) · evaluate (Pass@k, `axpo
eval`) · compare (`axpo compare`: methods over seeds, paired differences) · checkpoint (the run's
state and checkpoints) · logs (metrics.jsonl, progress) · plots · config · distributed · trainer.
"""
