"""What runs on a rank: the attention rank's step and the expert rank's loop. Plain classes, no Ray."""
