"""MedMoE training: pretraining, evaluation and fine-tuning scripts and the modules they share."""
