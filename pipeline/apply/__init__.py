"""Using the winner: ``methods`` (any method the report compares, loaded as one callable from images to
scores), ``feature_model`` (the exact frozen model a cache was made with, rebuilt), ``predict`` (`make
predict`: new images in, a CSV out) and ``export`` (`make export`: one self-contained model a user can
ship). They read what the earlier stages wrote and write nothing those stages read."""
