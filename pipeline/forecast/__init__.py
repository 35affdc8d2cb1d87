"""`make forecast`: whether the full fine-tune will pay, forecast from a few small ones before paying for it
(``curves``: the fitted forms; ``calibration``: the error measured in backtests; ``cost``: seconds; ``evidence``:
what the results hold; ``decide``: the forecast; ``record``: its table; ``text``: its sentence; ``stage``: the
stage that measures the small fine-tunes and writes it all)."""
