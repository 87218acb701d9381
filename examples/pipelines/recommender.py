"""Recommender: a user's embedding, their category, that category's products, top 5.

Dynamic lookup of the user's embedding (DIM floats) in the key-value store, a static
lookup of the category centroids, the nearest category, a dynamic lookup of that
category's product matrix (PRODUCTS x DIM float32, 5 MB), scores by dot product, and
the 5 best products in order. Under the default rules each dynamic lookup starts a
stage routed to the worker whose cache holds the key (locality). The data is generated
by `load_store`: USERS users around CATEGORIES category centroids.
"""

from __future__ import annotations

from typing import Any

import numpy as np

import serveflow as sf

USERS, CATEGORIES, PRODUCTS, DIM = 5000, 100, 2500, 512
TOP = 5


def user_key(i: int) -> str:
    return f"user:{i}"


def category_key(c: int) -> str:
    return f"category:{c}"


def pick_category(row: sf.Row) -> tuple[str, np.ndarray, str]:
    """The category whose centroid is nearest (largest dot product) the user's embedding."""
    embedding = row["embedding"]
    if embedding is None:
        raise KeyError(f"unknown user {row['user']!r}: not in the store (see load_store)")
    category = int(np.argmax(row["centroids"] @ embedding))
    return row["user"], embedding, category_key(category)


def top_products(row: sf.Row) -> tuple[str, str, list[int], list[float]]:
    """The TOP products of the category by score, best first (ties: lower id first)."""
    scores = row["products"] @ row["embedding"]
    best = np.argsort(-scores, kind="stable")[:TOP]
    return row["user"], row["category"], best.tolist(), [float(scores[i]) for i in best]


def build_flow() -> sf.Flow:
    flow = sf.Flow("recommender", schema={"user": str})
    users = flow.lookup("user", dynamic=True, into="embedding")
    centroids = users.lookup("centroids")
    picked = centroids.map(pick_category, names=["user", "embedding", "category"], name="pick")
    products = picked.lookup("category", dynamic=True, into="products")
    products.map(top_products, names=["user", "category", "top5", "scores"], name="top5")
    return flow


def load_store(kvs: Any, seed: int, *, users: int = USERS, categories: int = CATEGORIES) -> None:
    """Write `categories` centroids and product matrices and `users` embeddings into
    `kvs` (an app's `app.kvs` or any store with `put`); each user lies near one
    category, the popular categories (low ids) holding most users."""
    rng = np.random.default_rng(seed)
    centroids = rng.standard_normal((categories, DIM)).astype(np.float32)
    kvs.put("centroids", centroids)
    for c in range(categories):
        products = centroids[c] + rng.standard_normal((PRODUCTS, DIM)).astype(np.float32)
        kvs.put(category_key(c), products)
    home = np.minimum(rng.zipf(1.5, size=users) - 1, categories - 1)
    noise = 0.5 * rng.standard_normal((users, DIM)).astype(np.float32)
    for u in range(users):
        kvs.put(user_key(u), centroids[home[u]] + noise[u])


def make_inputs(n: int, seed: int, *, users: int = USERS) -> list[sf.Table]:
    """`n` requests of one user each, popular users (low ids) more often."""
    rng = np.random.default_rng(seed)
    ids = np.minimum(rng.zipf(1.3, size=n) - 1, users - 1)
    return [sf.Table({"user": [user_key(int(u))]}) for u in ids]


if __name__ == "__main__":
    from examples.pipelines.demo import main

    main("recommender")
