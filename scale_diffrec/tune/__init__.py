"""``scale-diffrec tune``: Ray Tune searches over ordinary training runs (see search.py)."""
