"""Offline reproduction of the GenDataCarto paper's experiments (``make reproduce``).

Modules: data (corpora, canaries, tokenization), models (LSTM LM, GPT-2-style decoder),
metrics (extraction, exposure, leakage, membership inference, perplexity), scores (every
detection score and the selection at a budget), goldfish (the goldfish-loss target mask), train
(record and intervention phases), run (configs and CLI), report and report_detection (figures
and RESULTS.md). Importing
``gdc_ext`` never imports this subpackage; it needs the ``experiments`` extra for real text.
"""
