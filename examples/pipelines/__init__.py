"""The five prediction pipelines of the Cloudflow paper (Sreekanti et al., 2020), written
with serveflow's public API: image cascade, video streams, translation, recommender and
ensemble. Each module exposes `build_flow()`, `make_inputs(n, seed)` and, when it reads
the key-value store, `load_store(kvs, seed)`. Which models are real and which are
random-weight architectures: see README.md ("The Cloudflow pipelines") and models.py.
"""

PIPELINES = ("cascade", "video", "translation", "recommender", "ensemble")
