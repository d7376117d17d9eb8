"""Rules for this box: routing profiles and the planner."""
