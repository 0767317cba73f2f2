"""Statistics over units of evidence (files, books, speakers): cluster bootstrap errors and paired comparisons.

Layer: above `metrics` (whose window and slope definitions it reuses), below `report` and `cli`.
"""
