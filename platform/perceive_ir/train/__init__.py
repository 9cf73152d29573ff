"""Training: plain-PyTorch stage-1/stage-2 steps, the DeepSpeed engine, the schedule, checkpoint state.

Everything here runs without Ray (one process, or torch.distributed with gloo); the
orchestration package only adds Ray Train around :func:`perceive_ir.train.loop.run_training`.
"""
