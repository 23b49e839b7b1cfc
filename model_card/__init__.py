"""Model card generation for saved MedMoE folders."""
