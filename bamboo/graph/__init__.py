"""Capture (torch.export, Dynamo), the pattern vocabulary and matcher, graph printing and statistics."""
