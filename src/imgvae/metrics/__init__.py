"""Feature networks and the distances between image sets that the evaluation and the losses use."""
