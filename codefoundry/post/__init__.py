"""Post-training: SFT and DPO data, loops and commands."""
