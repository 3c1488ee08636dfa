"""Launchers: torchrun / deepspeed / srun entry point, slurm templates, submitit."""
