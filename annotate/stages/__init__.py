"""The annotation stages, one file each; `chain.py` puts them in the order of the paper's pipeline."""
