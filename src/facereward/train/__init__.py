"""Trainers (base restorer, FRM, ReFL, LRPO), each a loop with a dataclass config, and the parts they share."""
