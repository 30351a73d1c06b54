"""Evaluation: an evaluation folder's layout, the metrics over it (registry), their torch-fidelity arithmetic,
image helpers and the ADM `.npz` export."""
