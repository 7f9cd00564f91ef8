"""`mixserve bench`: offline and online-serving benchmarks of mixserve against transformers.

Everything compared is measured in the same process run, on the same prompts, dtype and thread count,
after a warm-up. Results are frozen dataclasses written as JSON, printed as a table and plotted.
Performance is reported here, never asserted.
"""
