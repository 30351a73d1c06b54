"""The training data: datasets (image folders, cached latents, MRAR groups), crops, and their resumable order."""
